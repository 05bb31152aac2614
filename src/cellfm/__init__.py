"""cellfm: a fast, faithful PyTorch implementation of the CellFM single-cell foundation model.

Names are imported on first use so that `import cellfm` (and `cellfm --help`) does not load
torch or anndata.
"""

from cellfm.config import PRESETS, ModelConfig, get_preset
from cellfm.lazy_exports import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "CellBatch": "cellfm.batch",
    "CellFM": "cellfm.cellfm",
    "load": "cellfm.cellfm",
    "embed": "cellfm.embedding.memory",
    "embed_file": "cellfm.embedding.stream",
    "get_gene_embeddings": "cellfm.embedding.memory",
    "setup_cells": "cellfm.contract.setup",
}
__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = ["CellBatch", "CellFM", "ModelConfig", "PRESETS", "get_preset", "load", "embed", "embed_file",
           "get_gene_embeddings", "setup_cells"]
