"""Embedding: `engine` (batches through the encoder), `memory` (`embed`: AnnData in, obsm out) and
`stream` (`embed_file`: files streamed in chunks, resumable, split across torchrun ranks, with
`inputs` opening them through the contract).

Names are resolved on first use: `cellfm.cellfm` imports the engine, and `memory` / `stream`
import `cellfm.cellfm`, so this package imports none of them eagerly."""

from __future__ import annotations

from cellfm.lazy_exports import lazy_exports

_EXPORTS = {
    "embed": "cellfm.embedding.memory",
    "get_gene_embeddings": "cellfm.embedding.memory",
    "embed_file": "cellfm.embedding.stream",
    "default_batch_size": "cellfm.embedding.engine",
    "resolve_device": "cellfm.embedding.engine",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
