"""Our model folder: `config.json` + `model.safetensors` + `genes.txt` (one symbol per line).

Holds the format only, as parts (config, state dict, vocabulary): it builds no model object, so
the model class can sit above it. A folder is written into a temporary sibling and renamed into
place, so an interrupted save leaves either the old folder or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cellfm.config import ModelConfig
from cellfm.vocab import GeneVocabulary
from cellfm.wording import arg

FORMAT_VERSION = 1
FILES = ("config.json", "model.safetensors", "genes.txt")


def with_overrides(config: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    """`config` with the user's settings replaced; unknown names are refused with the known ones."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown model setting(s) {unknown}; ModelConfig fields are {sorted(known)}")
    return config.replace(**overrides) if overrides else config


def write_model_folder(
    path: str | Path,
    config: ModelConfig,
    state: Mapping[str, torch.Tensor],
    vocab: GeneVocabulary,
    *,
    overwrite: bool = False,
    extra_json: Mapping[str, dict] | None = None,
) -> Path:
    """Write a model folder (plus `extra_json` files, e.g. provenance) atomically; returns `path`.

    A non-empty `path` is replaced only with `overwrite=True`.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"{path} is not empty; pass {arg('overwrite', True)} to replace it")
    if len(vocab) != config.n_genes:
        raise ValueError(f"vocabulary {vocab.name!r} has {len(vocab)} genes but the config has "
                         f"n_genes={config.n_genes}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        meta = {"format_version": FORMAT_VERSION, "model": config.to_dict(),
                "vocabulary_sha256": vocab.sha256}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        vocab.to_file(tmp / "genes.txt")
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        _swap_in(tmp, path)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the disk holding {path.parent} while writing "
                                        "the model folder; nothing was changed") from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` is moved aside first and deleted after."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def read_model_folder(
    path: str | Path, **overrides: Any
) -> tuple[ModelConfig, dict[str, torch.Tensor], GeneVocabulary | None]:
    """(config with `overrides` applied, state dict, vocabulary from genes.txt or None)."""
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{path} is not a cellfm model folder: {f.name} is missing "
                                    "(a folder needs config.json, model.safetensors and genes.txt)")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer cellfm (format {meta['format_version']})")
    config = with_overrides(ModelConfig.from_dict(meta["model"]), overrides)
    genes = path / "genes.txt"
    vocab = GeneVocabulary.from_file(genes, name=config.vocabulary) if genes.is_file() else None
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"could not read {weights}: {err} (the file is corrupt or truncated)") from err
    return config, state, vocab


def state_mismatches(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from loading into a module whose state dict is `own` (empty: it fits)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if shapes:
        parts.append(f"shape mismatches {shapes[:10]}")
    return parts


def load_state_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict with an error that names every missing, unexpected or mis-shaped key."""
    parts = state_mismatches(module.state_dict(), state)
    if parts:
        raise ValueError(f"{source} does not fit this model config: " + "; ".join(parts))
    on_meta = any(p.device.type == "meta" for p in module.parameters())
    module.load_state_dict(state, strict=True, assign=on_meta)
