"""The authors' cell-type annotation model (`Net` of tutorials/CellAnnotation/annotation_model.py)
-> our encoder (`CellFMModule`) + head (`CellTypeHead`).

`Net` keeps its encoder (`Backbone`) under `extractor.` and the head beside it: `cluster_emb`
(one embedding per cell type), `query_layer.<i>.*` (cross-retention layers) and `classifier`.
The Backbone is the pretraining model without the zero embedding and the decoders, and it always
zeroes padding and removes it from the keys (pad_zero=True). Our encoder needs those tensors to
exist, so they are filled with zeros (the official initial value of the zero embedding; a zero
decoder predicts nothing) and a log line names them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cellfm.checkpoints.folder import load_state_checked, state_mismatches
from cellfm.checkpoints.official import (
    infer_config,
    official_to_ours,
    read_official_tensors,
    split_official_state,
)
from cellfm.config import ModelConfig
from cellfm.model import CellFMModule
from cellfm.model.cell_type_head import CellTypeHead

HEAD_PREFIXES = ("cluster_emb", "query_layer.", "classifier.")
# parts of our encoder that the official annotation Backbone does not have
NOT_IN_BACKBONE = ("zero_emb", "value_dec.", "cellwise_dec.")
log = logging.getLogger(__name__)


def read_official_annotation(
    path: str | Path, **overrides: Any
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder config, `CellFMModule` state dict, `CellTypeHead` state dict) of an official
    annotation checkpoint (MindSpore `.ckpt` or torch `.pt`). `overrides` are ModelConfig fields,
    e.g. `n_heads=` when the width is not the official 1536."""
    tensors = {k.removeprefix("extractor."): v for k, v in read_official_tensors(path).items()}
    head_names = [k for k in tensors if k.startswith(HEAD_PREFIXES)]
    if "cluster_emb" not in head_names:
        raise ValueError(f"{path} has no 'cluster_emb' tensor: not an official annotation checkpoint "
                         "(a pretrained CellFM checkpoint loads with cellfm.load)")
    head = {official_to_ours(k): torch.from_numpy(tensors.pop(k).astype("float32")) for k in head_names}
    encoder, _ = split_official_state(tensors)
    config = infer_config(encoder, **{"pad_zero": True, "add_zero": False, **overrides})
    with torch.device("meta"):
        own = CellFMModule(config).state_dict()
    filled = sorted(k for k in own if k not in encoder and k.startswith(NOT_IN_BACKBONE))
    for k in filled:
        encoder[k] = torch.zeros(own[k].shape)
    if filled:
        log.info("the annotation encoder has no %s: filled with zeros (unused by annotation)",
                 ", ".join(filled))
    parts = state_mismatches(own, encoder)
    if parts:
        raise ValueError(f"{path}: the encoder does not fit this model config: " + "; ".join(parts))
    return config, encoder, head


def head_layers(head_state: dict[str, torch.Tensor]) -> int:
    """Number of query layers in a `CellTypeHead` state dict."""
    return len({k.split(".")[1] for k in head_state if k.startswith("query_layer.")})


def load_official_annotation(
    path: str | Path, **overrides: Any
) -> tuple[ModelConfig, CellFMModule, CellTypeHead]:
    """The official annotation model as our encoder and head, in eval mode (head dropout: the
    official `enc_dropout`, i.e. `config.dropout`)."""
    config, encoder_state, head_state = read_official_annotation(path, **overrides)
    encoder = CellFMModule(config)
    load_state_checked(encoder, encoder_state, source=str(path))
    head = CellTypeHead(config.d_model, config.n_heads, head_state["cluster_emb"].shape[0], config.dropout,
                        config.layer_norm_eps, n_layers=head_layers(head_state))
    load_state_checked(head, head_state, source=f"{path} (annotation head)")
    return config, encoder.eval(), head.eval()
