"""One name -> model parts: the single place that decides what `cellfm.load(name_or_path)` means.

A name is, in this order: an existing model folder or official checkpoint file, a built-in model
shipped in `cellfm/pretrained/`, or an official release ("cellfm-80m", "cellfm-800m") fetched and
converted into the cache on first use. Config overrides reach the config in every case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cellfm.checkpoints.folder import read_model_folder
from cellfm.checkpoints.hub import OFFICIAL_WEIGHTS, download_official, is_official_name
from cellfm.checkpoints.official import read_official_checkpoint
from cellfm.config import ModelConfig
from cellfm.vocab import GeneVocabulary

PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"


def builtin_names() -> list[str]:
    return sorted(d.name for d in PRETRAINED_DIR.glob("*") if (d / "config.json").is_file())


def read_model(
    name_or_path: str | Path, **overrides: Any
) -> tuple[ModelConfig, dict[str, torch.Tensor], GeneVocabulary | None]:
    """(config with `overrides`, state dict, vocabulary or None for the built-in one) of a
    built-in name, an official release name, a model folder or an official checkpoint file."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return read_model_folder(p, **overrides)
    if p.is_file():
        config, state = read_official_checkpoint(p, **overrides)
        return config, state, None
    name = str(name_or_path)
    if name in builtin_names():
        return read_model_folder(PRETRAINED_DIR / name, **overrides)
    if is_official_name(name):
        return read_model_folder(download_official(name.lower()), **overrides)
    raise FileNotFoundError(
        f"{name!r} is neither a built-in model ({builtin_names() or 'none installed'}), an official "
        f"model ({', '.join(OFFICIAL_WEIGHTS)}; fetched on first use), a model folder nor a checkpoint file."
    )
