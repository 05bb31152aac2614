"""Model configuration: one typed dataclass and the named presets.

The official code keeps its settings in plain classes (`Config`, `Config_80M`); here every knob
that changes the computation is a field, and presets are named instances. Nothing in this file
allocates tensors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of a CellFM model.

    `n_genes` is the vocabulary size; the gene table has `n_genes + 1` rows (row 0 = padding)
    rounded up to a multiple of 8, as in the official checkpoints.
    """

    n_genes: int = 27855
    vocabulary: str = "cellfm-27k"  # name of the built-in vocabulary the ids refer to
    d_model: int = 1536
    n_layers: int = 2
    n_heads: int = 48
    value_bins: int = 256  # width of the value encoder's soft binning
    dropout: float = 0.1  # dropout of layer i is dropout * i / n_layers (official)
    max_genes: int = 2048  # at most this many expressed genes per cell enter the encoder
    pad_zero: bool = True  # official `pad_zero`: padding is zeroed and removed from the keys
    add_zero: bool = False  # official `add_zero`: zero-probability heads (only without pad_zero)
    lora_rank: int = 0  # rank of LoRA adapters; 0 = none
    st_tokens: bool = False  # the authors' FinetuneModel ST tokens (library size); used when given
    layer_norm_eps: float = 1e-7  # MindSpore's LayerNorm default, not PyTorch's 1e-5
    mask_ratio: float = 0.2  # fraction of expressed genes in the pretraining loss
    hide_fraction: float = 0.8  # of those, fraction whose value is hidden from the encoder
    # not in the official model: the cell-wise decoder adds the cell's mean visible value to its
    # prediction, so the CLS need not spend itself on the library-size level (see docs/cell-identity.md)
    cellwise_offset: bool = False

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_layers < 1 or self.n_genes < 1:
            raise ValueError("n_layers and n_genes must be positive")
        if self.add_zero and self.pad_zero:
            raise ValueError("add_zero needs pad_zero=False (the official code ignores it otherwise)")

    @property
    def gene_table_rows(self) -> int:
        return self.n_genes + 1 + (-self.n_genes - 1) % 8

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def residual_alpha(self) -> float:
        """DeepNorm scale of the residual branch, (2 * n_layers) ** 0.25."""
        return (2 * self.n_layers) ** 0.25

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class Preset:
    name: str
    config: ModelConfig
    description: str = ""
    official_parameters: int | None = field(default=None)


# The 80M release uses the expanded 27,855-gene list (its tutorials and the authors' PyTorch port
# build it with 27855 genes); the 800M "base_weight" uses the 24,078-gene `gene_info.csv`.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        ModelConfig(n_genes=27855, vocabulary="cellfm-27k", d_model=32, n_layers=2, n_heads=4,
                    value_bins=16, dropout=0.0),
        "for tests: 2 layers, width 32",
    ),
    "small": Preset(
        "small",
        ModelConfig(n_genes=27855, vocabulary="cellfm-27k", d_model=128, n_layers=4, n_heads=8,
                    value_bins=64),
        "for CPUs: 4 layers, width 128",
    ),
    "80m": Preset(
        "80m",
        ModelConfig(n_genes=27855, vocabulary="cellfm-27k", d_model=1536, n_layers=2, n_heads=48),
        "official CellFM 80M (CellFM_80M_weight.ckpt)",
    ),
    "800m": Preset(
        "800m",
        ModelConfig(n_genes=24078, vocabulary="cellfm-24k", d_model=1536, n_layers=40, n_heads=48),
        "official CellFM 800M (base_weight.ckpt)",
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name.lower()].config
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
