"""Saving and loading a fitted `CellTypeAnnotator`, and building its head from a name or a
saved spec. Format 2: `annotator.json` (classes, settings, calibration, history), `head.safetensors`
(head weights and open-set statistics), `encoder/` unless the encoder is an unchanged named model.
Files are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cellfm.model.cell_type_head import CellTypeHead
from cellfm.tasks.annotation_head import AnnotationHead
from cellfm.tasks.annotation_open_set import OpenSetRule

if TYPE_CHECKING:
    from cellfm.tasks.annotation import CellTypeAnnotator

FORMAT_VERSION = 2
HEAD_DROPOUT = 0.1  # official cfg.enc_dropout, used by the query layers


def save_annotator(ann: CellTypeAnnotator, path: str | Path, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    if ann.head is None:
        raise RuntimeError("nothing to save: the annotator is not fitted")
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty; pass overwrite=True to replace it")
    path.mkdir(parents=True, exist_ok=True)
    rule = ann.open_set
    meta = {
        "format_version": FORMAT_VERSION,
        "classes": ann.classes,
        "settings": ann.settings,
        "temperature": ann.temperature,
        "threshold": rule.threshold,
        "distance_cutoff": rule.distance_cutoff,
        "reference_rejected_fraction": rule.reference_rejected,
        "reference_genes": ann.reference_genes,
        "encoder_source": ann.encoder_source,
        "history": ann.history,
        "stops": ann.stops,
        "head": head_spec(ann.head),
    }
    tensors = {f"head.{k}": v.contiguous() for k, v in ann.head.state_dict().items()}
    tensors.update(
        {
            k: torch.from_numpy(np.ascontiguousarray(getattr(rule, k)))
            for k in ("centroids", "emb_mean", "emb_std")
        }
    )
    write_atomic(path / "annotator.json", lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))
    write_atomic(path / "head.safetensors", lambda p: save_file(tensors, str(p)))
    if ann.encoder_source is None:
        ann.encoder.save(path / "encoder", overwrite=True)
    return path


def load_annotator(ann: CellTypeAnnotator, path: str | Path) -> CellTypeAnnotator:
    from safetensors.torch import load_file

    from cellfm.cellfm import CellFM, load

    path = Path(path)
    if not (path / "annotator.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved CellTypeAnnotator (annotator.json is missing)")
    meta = json.loads((path / "annotator.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} was saved by an older cellfm (format {meta.get('format_version')}); fit it again"
        )
    ann.classes, ann.settings = meta["classes"], meta["settings"]
    ann.temperature, ann.reference_genes = meta["temperature"], meta["reference_genes"]
    ann.encoder_source, ann.history, ann.stops = meta["encoder_source"], meta["history"], meta["stops"]
    t = load_file(str(path / "head.safetensors"))
    spec = meta["head"]
    ann.head_type = spec["type"]
    ann.head = head_from_spec(spec, len(ann.classes))
    ann.head.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("head.")})
    ann.head.eval()
    ann.open_set = OpenSetRule(
        t["emb_mean"].numpy(),
        t["emb_std"].numpy(),
        t["centroids"].numpy(),
        meta["distance_cutoff"],
        meta["threshold"],
        meta["reference_rejected_fraction"],
    )
    ann.encoder = CellFM.load(path / "encoder") if ann.encoder_source is None else load(ann.encoder_source)
    return ann


def new_head(head: str, config, n_cls: int) -> nn.Module:
    if head == "official":
        return CellTypeHead(config.d_model, config.n_heads, n_cls, HEAD_DROPOUT, config.layer_norm_eps)
    return AnnotationHead(config.d_model, n_cls)


def head_spec(head: nn.Module) -> dict:
    if isinstance(head, CellTypeHead):
        attn = head.query_layer[0].attn1
        return {
            "type": "official",
            "d_model": head.cluster_emb.shape[1],
            "n_heads": attn.n_heads,
            "n_layers": len(head.query_layer),
            "eps": head.query_layer[0].post_norm1.eps,
        }
    return {"type": "cls_mlp", "d_model": head.class_emb.shape[1], "hidden": head.mlp[0].out_features}


def head_from_spec(spec: dict, n_cls: int) -> nn.Module:
    if spec["type"] == "official":
        return CellTypeHead(
            spec["d_model"], spec["n_heads"], n_cls, HEAD_DROPOUT, spec["eps"], spec["n_layers"]
        )
    return AnnotationHead(spec["d_model"], n_cls, hidden=spec["hidden"])


def write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)
