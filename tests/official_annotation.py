"""The official annotation `Net` of the parity fixture (tests/fixtures/parity/annotation_*.npz),
written as a MindSpore checkpoint with the official tensor names: what a user of the authors'
CellAnnotation tutorial has on disk."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cellfm.checkpoints import write_mindspore_checkpoint
from cellfm.config import get_preset

FIXTURE = Path(__file__).parent / "fixtures" / "parity"


def write_official_annotation_checkpoint(path: Path) -> tuple:
    """Write the checkpoint (with Adam state, as the tutorial saves it) to `path`; returns the
    fixture's (inputs, official outputs) npz files. The model is the `tiny` shape with 4 heads."""
    z, ref = np.load(FIXTURE / "annotation_inputs.npz"), np.load(FIXTURE / "annotation_official.npz")
    ours = {k[2:]: z[k] for k in z.files if k.startswith("w:")}
    table = np.zeros((get_preset("tiny").gene_table_rows, 32), np.float32)
    table[z["used_rows"]] = z["gene_rows"]
    official = {}
    for name in ours:
        k = re.sub(r"(post_norm\d)\.weight$", r"\1.gamma", name)
        k = re.sub(r"(post_norm\d)\.bias$", r"\1.beta", k)
        if k.startswith("enc."):
            k = "extractor." + re.sub(r"^value_enc\.(w1|w3|table|a)\b", r"value_enc.value_enc.\1", k[4:])
        else:
            k = k[5:]
        official[k] = ours[name]
    official["extractor.gene_emb"] = table
    wanted = {k[2:] for k in ref.files if k.startswith("g:")}  # every parameter of the official Net
    official = {k: v for k, v in official.items() if k in wanted}
    assert set(official) == wanted
    official.update({f"moment1.{k}": np.zeros_like(v) for k, v in official.items()})  # Adam state
    write_mindspore_checkpoint(official, path)

    return z, ref
