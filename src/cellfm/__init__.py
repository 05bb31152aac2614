"""cellfm: a fast, faithful PyTorch implementation of the CellFM single-cell foundation model."""

from cellfm.batch import CellBatch
from cellfm.cellfm import CellFM, load
from cellfm.config import PRESETS, ModelConfig, get_preset

__version__ = "0.1.0"


def __getattr__(name: str):
    # embed pulls in anndata; keep `import cellfm` (and the CLI's --help) light
    if name in ("embed", "get_gene_embeddings"):
        from cellfm import embed as _embed_module

        return getattr(_embed_module, name)
    raise AttributeError(f"module 'cellfm' has no attribute {name!r}")


__all__ = ["CellBatch", "CellFM", "ModelConfig", "PRESETS", "get_preset", "load", "embed",
           "get_gene_embeddings"]
