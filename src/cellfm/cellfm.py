"""`CellFM`: the user-facing model object (scvi-tools style).

It holds a `ModelConfig`, the `CellFMModule` and the `GeneVocabulary` its gene ids refer to, and
knows folders and AnnData; the module knows only tensors. Files are read and written as parts by
`cellfm.checkpoints` (our folder: `config.json` + `model.safetensors` + `genes.txt`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from cellfm.checkpoints import PRETRAINED_DIR, load_state_checked, read_model, write_model_folder
from cellfm.config import ModelConfig, get_preset
from cellfm.contract.setup import setup_cells
from cellfm.embedding.engine import embed_cells
from cellfm.model import CellFMModule
from cellfm.vocab import GeneVocabulary, load_vocabulary, map_genes

if TYPE_CHECKING:
    import anndata as ad

log = logging.getLogger(__name__)
__all__ = ["PRETRAINED_DIR", "CellFM", "load"]


class CellFM:
    """A CellFM model with its vocabulary.

    Examples
    --------
    >>> model = cellfm.load("cellfm-mini")
    >>> cellfm.embed(adata, model)          # adata.obsm["X_cellfm"]
    >>> genes = model.get_gene_embeddings()  # DataFrame, one row per vocabulary gene
    """

    def __init__(
        self,
        config: ModelConfig,
        module: CellFMModule | None = None,
        vocab: GeneVocabulary | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.config = config
        self.module = module if module is not None else CellFMModule(config)
        self.vocab = vocab if vocab is not None else load_vocabulary(config.vocabulary)
        if len(self.vocab) != config.n_genes:
            raise ValueError(
                f"vocabulary {self.vocab.name!r} has {len(self.vocab)} genes but the model "
                f"expects n_genes={config.n_genes}"
            )
        self.module.eval()
        if device is not None:
            self.to(device)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, device: str | torch.device | None = None, **overrides) -> CellFM:
        """A randomly initialised model of a named preset (`tiny`, `small`, `80m`, `800m`).

        `device="meta"` builds the shapes only, without allocating memory.
        """
        config = get_preset(name).replace(**overrides)
        if device is not None and torch.device(device).type == "meta":
            with torch.device("meta"):
                module = CellFMModule(config)
            return cls(config, module)
        return cls(config, CellFMModule(config), device=device)

    @property
    def device(self) -> torch.device:
        return self.module.gene_emb.device

    def to(self, device: str | torch.device) -> CellFM:
        self.module.to(device)
        return self

    def num_parameters(self) -> int:
        return self.module.num_parameters()

    def with_st_tokens(self) -> CellFM:
        """This model when its weights carry the ST tokens of the authors' fine-tuning model, else
        a copy with new ones (official init, to be trained); the original is untouched."""
        if self.config.st_tokens:
            return self
        config = self.config.replace(st_tokens=True)
        module = CellFMModule(config)
        missing, unexpected = module.load_state_dict(self.module.state_dict(), strict=False)
        if unexpected or not all(k.startswith("st.") for k in missing):
            raise RuntimeError(f"internal error: weights do not fit the ST model: {missing}, {unexpected}")
        log.info("model has no ST-token weights: new ones are initialised (%s)", ", ".join(missing))
        return CellFM(config, module.to(self.device), self.vocab)

    # ---- persistence --------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write `config.json`, `model.safetensors` and `genes.txt` into folder `path` (atomically:
        an interrupted save leaves no half-written folder)."""
        state = self.module.state_dict()
        return write_model_folder(path, self.config, state, self.vocab, overwrite=overwrite)

    @classmethod
    def load(
        cls, name_or_path: str | Path, device: str | torch.device | None = None, **overrides: Any
    ) -> CellFM:
        """Load a model: a built-in name (e.g. "cellfm-mini"), an official release ("cellfm-80m",
        "cellfm-800m": downloaded and converted into the cache on first use, see
        `cellfm.checkpoints.hub`), a model folder, or an official checkpoint file (MindSpore `.ckpt`,
        or a CellFM-torch `.pt`/`.pth`).

        `overrides` replace `ModelConfig` fields, e.g. `n_heads=` for an official checkpoint whose
        width is not 1536 (the number of heads is not stored in it) or `pad_zero=` (official
        checkpoints take it from their release's official config).

        Examples
        --------
        >>> model = cellfm.load("cellfm-80m")                        # same as CellFM.load
        >>> model = cellfm.load("my_finetune.ckpt", n_heads=8, pad_zero=False)
        """
        config, state, vocab = read_model(name_or_path, **overrides)
        module = CellFMModule(config)
        load_state_checked(module, state, source=str(name_or_path))
        return cls(config, module, vocab, device=device)

    # ---- results ------------------------------------------------------------------------
    def get_gene_embeddings(self, genes: list[str] | None = None) -> pd.DataFrame:
        """Gene-table embeddings as a DataFrame indexed by vocabulary gene symbol: all vocabulary
        genes, or `genes` (symbols, aliases or Ensembl ids) in that order; unknown genes raise."""
        table = self.module.gene_emb.detach().float().cpu().numpy()  # (rows, D), row 0 = padding
        symbols = np.asarray(self.vocab.genes, dtype=object)
        if genes is None:
            ids = np.arange(1, len(symbols) + 1)
        else:
            unique = pd.unique(pd.Index([str(g) for g in genes]))  # map_genes drops repeats as duplicates
            found = dict(zip(unique, map_genes(unique, self.vocab, min_genes=0).token_ids, strict=True))
            ids = np.array([found[str(g)] for g in genes], dtype=np.int64)
            unknown = [g for g, i in zip(genes, ids, strict=True) if i <= 0]
            if unknown:
                raise KeyError(f"{len(unknown)} genes are not in vocabulary {self.vocab.name!r}: "
                               f"{unknown[:10]}")
        columns = [f"dim_{i}" for i in range(table.shape[1])]
        return pd.DataFrame(table[ids], index=pd.Index(symbols[ids - 1], name="gene"), columns=columns)

    def get_cell_embeddings(self, adata: ad.AnnData, *, batch_size: int | None = None,
                            device: str | torch.device | None = None, st_tokens: bool = False,
                            progress: bool = True, **setup) -> np.ndarray:
        """CLS embeddings (n_cells, d_model) float32 in adata's row order; `adata` is only read (a
        backed one stays backed). `setup`: `layer`, `use_raw`, `gene_key`, `allow_non_integer`,
        `max_genes`, `empty`, `seed`, as in `cellfm.contract.setup_cells`. `cellfm.embed` writes
        the same into `adata.obsm`."""
        cells = setup_cells(adata, self, **setup)
        return embed_cells(cells, self, batch_size=batch_size, device=device, st_tokens=st_tokens,
                           progress=progress)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"CellFM(d_model={c.d_model}, n_layers={c.n_layers}, n_heads={c.n_heads}, "
            f"vocabulary={c.vocabulary!r} ({c.n_genes} genes), parameters={self.num_parameters():,})"
        )


load = CellFM.load
