"""Embedding: `engine` (batches through the encoder), `memory` (`embed`: AnnData in, obsm out) and
`stream` (`embed_file`: files streamed in chunks, resumable, split across torchrun ranks, with
`inputs` opening them through the contract).

Names are resolved on first use: `cellfm.cellfm` imports the engine, and `memory` / `stream`
import `cellfm.cellfm`, so this package imports none of them eagerly."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "embed": "cellfm.embedding.memory",
    "get_gene_embeddings": "cellfm.embedding.memory",
    "embed_file": "cellfm.embedding.stream",
    "default_batch_size": "cellfm.embedding.engine",
    "resolve_device": "cellfm.embedding.engine",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cellfm.embedding' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
