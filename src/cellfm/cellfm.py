"""`CellFM`: the user-facing model object (scvi-tools style).

It holds a `ModelConfig`, the `CellFMModule` and the `GeneVocabulary` its gene ids refer to, and
knows folders and AnnData; the module knows only tensors. Our folder format is
`config.json` + `model.safetensors` + `genes.txt` (the vocabulary, one symbol per line).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from cellfm.config import ModelConfig, get_preset
from cellfm.contract.setup import setup_cells
from cellfm.embedding.engine import embed_cells
from cellfm.model import CellFMModule
from cellfm.vocab import GeneVocabulary, load_vocabulary, map_genes

if TYPE_CHECKING:
    import anndata as ad

FORMAT_VERSION = 1
log = logging.getLogger(__name__)
PRETRAINED_DIR = Path(__file__).parent / "pretrained"


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
        """Write `config.json`, `model.safetensors` and `genes.txt` into folder `path`."""
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} is not empty; pass overwrite=True to replace it")
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "model": self.config.to_dict(),
                "vocabulary_sha256": self.vocab.sha256}
        (path / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        self.vocab.to_file(path / "genes.txt")
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> CellFM:
        """Load a model folder written by `save`."""
        path = Path(path)
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        for f in (cfg_file, weights):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{path} is not a cellfm model folder: {f.name} is missing "
                    "(a folder needs config.json, model.safetensors and genes.txt)"
                )
        meta = json.loads(cfg_file.read_text())
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer cellfm (format {meta['format_version']})")
        config = ModelConfig.from_dict(meta["model"])
        genes = path / "genes.txt"
        vocab = GeneVocabulary.from_file(genes, name=config.vocabulary) if genes.is_file() else None
        module = CellFMModule(config)
        try:
            state = load_file(str(weights))
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"could not read {weights}: {err} (the file is corrupt or truncated)") from err
        load_state_checked(module, state, source=str(weights))
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


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with an error that names every missing, unexpected or mis-shaped key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:10]}")
        raise ValueError(f"{source} does not fit this model config: " + "; ".join(parts))
    module.load_state_dict(state, strict=True, assign=module.gene_emb.device.type == "meta")


def load(name_or_path: str | Path, device: str | torch.device | None = None) -> CellFM:
    """Load a model: a built-in name (e.g. "cellfm-mini"), an official release ("cellfm-80m",
    "cellfm-800m": downloaded and converted into the cache on first use, see
    `cellfm.checkpoints.hub`), a model folder, or an official checkpoint file (MindSpore `.ckpt`,
    or a CellFM-torch `.pt`/`.pth`)."""
    p = Path(name_or_path)
    builtin = PRETRAINED_DIR / str(name_or_path)
    if not p.exists() and (builtin / "config.json").is_file():
        return CellFM.load(builtin, device=device)
    if p.is_dir():
        return CellFM.load(p, device=device)
    if p.is_file():
        from cellfm.checkpoints import load_official_checkpoint

        return load_official_checkpoint(p, device=device)
    from cellfm.checkpoints.hub import OFFICIAL_WEIGHTS, is_official_name, load_official

    if is_official_name(str(name_or_path)):
        return load_official(str(name_or_path), device=device)
    names = sorted(d.name for d in PRETRAINED_DIR.glob("*") if (d / "config.json").is_file())
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a built-in model ({names or 'none installed'}), an official "
        f"model ({', '.join(OFFICIAL_WEIGHTS)}; fetched on first use), a model folder nor a "
        "checkpoint file."
    )
