"""`TrainConfig`: every pretraining knob in one dataclass, loadable from a TOML file.

TOML layout: top-level keys are `TrainConfig` fields; a `[model]` table overrides fields of the
named `preset` (see `cellfm.config.ModelConfig`). Unknown keys are errors, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellfm.config import ModelConfig, get_preset

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

PARALLEL_MODES = ("none", "ddp", "fsdp")


@dataclass
class TrainConfig:
    """Pretraining settings. Defaults follow the official `train.py` where it has one.

    The learning rate warms up linearly from `start_lr` to `lr` over `warmup_steps`, then follows
    a half cosine down to `min_lr` over `decay_steps` (default: the remaining steps), then stays
    there (official `WarmCosineDecay` with the official 1e-7 / 1e-6 / 5e-7, which were chosen for
    continuing from the released weights). Adam with betas (0.9, 0.95), eps 1e-8 and an L2 weight
    decay of 1e-5 on matrices only (official `set_weight_decay` exempts embeddings, norms and
    biases); every gradient clipped to norm 1 on its own (official `ClipByNorm`).
    """

    corpus_dir: str
    out_dir: str
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides of the preset
    batch_size: int = 32  # cells per batch per process
    max_steps: int = 1000
    init_from: str | None = None  # continue pretraining from a model (name, folder or official file)
    lr: float = 1e-6  # peak learning rate (official config; from scratch a small model wants ~1e-3)
    start_lr: float = 1e-7
    min_lr: float = 5e-7
    warmup_steps: int = 100
    decay_steps: int | None = None  # None: max_steps - warmup_steps
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    grad_clip_mode: str = "per_tensor"  # official: each gradient clipped to norm grad_clip; or "global"
    seed: int = 0
    val_fraction: float = 0.05  # held-out cells (deterministic hash split of the corpus)
    eval_every: int = 200
    eval_batches: int = 16  # held-out batches per evaluation (per process); 0 = all
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    parallel: str = "none"  # "none" | "ddp" | "fsdp" (FSDP2 fully_shard)
    activation_checkpointing: bool = False
    bf16: bool = True  # autocast to bfloat16 on CUDA (ignored on CPU)
    device: str = "auto"  # "auto": cuda:LOCAL_RANK if available, else cpu
    num_workers: int = 0  # DataLoader worker processes per training process
    threads: int | None = None  # torch.set_num_threads for CPU runs
    mix_shards: int = 16  # cells of this many corpus shards are shuffled together (1: a shard at a time)
    # not official (0 = off): hidden value-0 targets for genes a cell does not express, this many per
    # loss position (see CorpusDataset); makes "which genes are on" a target, i.e. cell identity
    unexpressed_ratio: float = 0.0
    cellwise_weight: float = 1.0  # weight of the cell-wise (CLS) decoder's loss terms; official 1
    # cell-identity probe: labelled .h5ad files (raw counts) whose CLS embeddings are scored by kNN and
    # linear-probe accuracy at step 0 and at every evaluation; probe_label_key: one obs column for
    # all files, or one per file
    probe_files: list[str] = field(default_factory=list)
    probe_label_key: str | list[str] = "cell_type"
    probe_max_cells: int = 2000
    # read batches straight from a SOMA query instead of corpus_dir (keys of cellfm.corpus.soma.SomaQuery:
    # uri or census_version, measurement, layer, obs_filter; plus min_genes, io_batch_size,
    # shuffle_chunk_size); import once with `cellfm corpus build` and train from shards when you can
    soma: dict[str, Any] = field(default_factory=dict)
    stop_after_steps: int | None = None  # stop (as if killed) after this step; for resume tests
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # TOML gives a list
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {PARALLEL_MODES}, not {self.parallel!r}")
        for name in ("batch_size", "max_steps", "eval_every", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grad_clip_mode not in ("per_tensor", "global"):
            raise ValueError(f"grad_clip_mode must be 'per_tensor' or 'global', not {self.grad_clip_mode!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, max_steps={self.max_steps}]")
        if isinstance(self.probe_label_key, list) and len(self.probe_label_key) != len(self.probe_files):
            raise ValueError(f"probe_label_key has {len(self.probe_label_key)} entries for "
                             f"{len(self.probe_files)} probe_files: give one key, or one per file")
        if self.mix_shards < 1:
            raise ValueError(f"mix_shards must be >= 1, got {self.mix_shards}")
        if self.unexpressed_ratio < 0:
            raise ValueError(f"unexpressed_ratio must be >= 0, got {self.unexpressed_ratio}")
        if self.cellwise_weight < 0:
            raise ValueError(f"cellwise_weight must be >= 0, got {self.cellwise_weight}")
        self.model_config()  # fail now on a bad preset or override, not after the corpus loads

    def probe_label_keys(self) -> list[str]:
        keys = self.probe_label_key
        return list(keys) if isinstance(keys, list) else [keys] * len(self.probe_files)

    def model_config(self) -> ModelConfig:
        base = get_preset(self.preset)
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.model) - known)
        if unknown:
            raise ValueError(f"unknown [model] keys {unknown}; ModelConfig fields are {sorted(known)}")
        return base.replace(**self.model)

    @property
    def total_decay_steps(self) -> int:
        if self.decay_steps is not None:
            return self.decay_steps
        return max(1, self.max_steps - self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; known keys: {sorted(known)}")
        if data.get("soma"):  # a SOMA source stands in for the corpus folder
            data = {"corpus_dir": "", **data}
        missing = [k for k in ("corpus_dir", "out_dir") if k not in data]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a TOML file; relative `corpus_dir` / `out_dir` are relative to the file's folder."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path} is not valid TOML: {err}") from err
        data.update(overrides)
        for key in ("corpus_dir", "out_dir"):
            if data.get(key) and not Path(data[key]).expanduser().is_absolute():
                data[key] = str((path.parent / data[key]).resolve())
        data["probe_files"] = [f if Path(f).expanduser().is_absolute() else str((path.parent / f).resolve())
                               for f in data.get("probe_files", [])]
        return cls.from_dict(data, source=str(path))
