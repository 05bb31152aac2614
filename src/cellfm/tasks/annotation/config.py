"""`AnnotatorConfig`: every setting of a `CellTypeAnnotator`, given once at construction and saved
with it (scvi-tools style: the model and its settings first, the data at `fit`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

Mode = Literal["frozen", "lora", "full"]
HeadChoice = Literal["auto", "official", "cls_linear", "cls_mlp"]
MODES = ("frozen", "lora", "full")
HEADS = ("auto", "official", "cls_linear", "cls_mlp")


@dataclass
class AnnotatorConfig:
    """Settings of cell type annotation.

    head
        "auto" (default): with `mode="frozen"` train the official head and a linear head on the CLS
        and keep the one with the better macro-F1 on held-out reference cells (both scores are kept
        in `settings["head_selection"]`); with lora / full it means "official". "official": the
        authors' head (type queries over the gene tokens). "cls_linear": logistic regression on the
        CLS. "cls_mlp": a residual MLP on the CLS.
    selection_margin
        With "auto", the official head is kept only if its held-out macro-F1 beats the linear
        head's by more than this (the scores are noisy; the linear head is then refitted on all
        reference cells and equals logistic regression on the model's CLS).
    mode
        "frozen" (encoder fixed, its outputs cached once), "lora" or "full" (the encoder trains).
    val_fraction
        Share of the reference held out (stratified) for early stopping, head selection,
        temperature and the rejection cut-offs; at least `min_val_cells` cells.
    max_epochs
        Head epochs on the frozen encoder (default 40 official / 100 cls_mlp), of joint training
        (lora / full) 10.
    smoothing
        Early stopping watches an exponential moving average of the validation loss with this
        weight on the newest epoch (1.0: the raw loss), so one noisy epoch neither stops training
        nor is kept as "best".
    standardise_states
        The official head trained here reads the encoder states standardised per feature (means and
        sds of the training cells' CLS and gene tokens, kept with the head), as the CLS heads do;
        False: the raw states. A checkpoint of the authors (`annotator_from_official`) always
        reads raw states, as it was trained.
    threshold, max_rejected
        Requested minimum confidence, lowered at fit only as far as needed for the rejection rule
        to call at most `max_rejected` of a query from the reference's own distribution "unknown"
        (the held-out reference cells are held to a lower share with that 95 % upper bound:
        `open_set.calibration_target`).
    device
        None: CUDA when available, else CPU.
    """

    head: HeadChoice = "auto"
    selection_margin: float = 0.02
    mode: Mode = "frozen"
    val_fraction: float = 0.2
    min_val_cells: int = 100
    max_epochs: int | None = None
    patience: int = 5
    smoothing: float = 0.5
    batch_size: int = 32
    lr: float = 1e-4
    head_lr: float = 1e-3
    lora_rank: int = 8
    class_weights: bool = True
    standardise_states: bool = True
    min_cells_per_class: int = 5
    threshold: float = 0.5
    max_rejected: float = 0.05
    st_tokens: bool = False
    device: str | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'frozen', 'lora' or 'full', not {self.mode!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(map(repr, HEADS))}, not {self.head!r}")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if not 0 <= self.max_rejected < 1:
            raise ValueError(f"max_rejected must be in [0, 1), got {self.max_rejected}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if self.device is not None:
            self.device = str(self.device)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AnnotatorConfig:
        """Known keys only, so a config saved by a newer release still loads."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
