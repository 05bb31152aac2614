"""The files of a saved annotator: `annotator.json` (classes, config, settings, calibration,
history), `head.safetensors` (head weights and open-set statistics) and `encoder/` unless the
encoder is an unchanged named model. Each file is written atomically (`cellfm.io.write`).
It knows files and tensors, not the annotator class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cellfm.cellfm import CellFM, load
from cellfm.io.write import atomic_path, write_text
from cellfm.model.annotation_head import AnnotationHead
from cellfm.tasks.annotation.heads import head_from_spec
from cellfm.tasks.annotation.open_set import OpenSetRule

FORMAT_VERSION = 3
_RULE_ARRAYS = ("centroids", "emb_mean", "emb_std")


def save_parts(
    path: str | Path,
    meta: dict,
    head: AnnotationHead,
    rule: OpenSetRule,
    encoder: CellFM | None,
    overwrite: bool = False,
) -> Path:
    """Write a fitted annotator's parts; `encoder` None: only its name (in `meta`) is kept."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty; pass overwrite=True to replace it")
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        **meta,
        "head": head.spec(),
        "rule": {"distance_cutoff": rule.distance_cutoff, "threshold": rule.threshold,
                 "reference_rejected": rule.reference_rejected},
    }
    tensors = {f"head.{k}": v.contiguous() for k, v in head.state_dict().items()}
    tensors.update({k: torch.from_numpy(np.ascontiguousarray(getattr(rule, k))) for k in _RULE_ARRAYS})
    write_text(path / "annotator.json", json.dumps(meta, indent=1) + "\n")
    with atomic_path(path / "head.safetensors") as tmp:
        save_file(tensors, str(tmp))
    if encoder is not None:
        encoder.save(path / "encoder", overwrite=True)
    return path


def load_parts(path: str | Path) -> tuple[dict, AnnotationHead, OpenSetRule, CellFM]:
    """(meta, head with its weights, open-set rule, encoder) of a folder written by `save_parts`."""
    path = Path(path)
    if not (path / "annotator.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved CellTypeAnnotator (annotator.json is missing)")
    meta = json.loads((path / "annotator.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} was saved by another cellfm release (format {meta.get('format_version')}, this one "
            f"reads {FORMAT_VERSION}); fit it again"
        )
    t = load_file(str(path / "head.safetensors"))
    head = head_from_spec(meta["head"])
    head.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("head.")})
    head.eval()
    r = meta["rule"]
    rule = OpenSetRule(t["emb_mean"].numpy(), t["emb_std"].numpy(), t["centroids"].numpy(),
                       r["distance_cutoff"], r["threshold"], r["reference_rejected"])
    source = meta.get("encoder_source")
    encoder = CellFM.load(path / "encoder") if source is None else load(source)
    return meta, head, rule, encoder
