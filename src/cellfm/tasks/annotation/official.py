"""An official CellFM annotation checkpoint (the authors' `Net`: encoder + `CellTypeHead`) as a
`CellTypeAnnotator`, through `cellfm.checkpoints.official_annotation`. The checkpoint holds no
class names, so the caller gives them in the order of the head's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad

from cellfm.cellfm import CellFM
from cellfm.checkpoints.official_annotation import load_official_annotation
from cellfm.tasks.annotation.annotator import CellTypeAnnotator
from cellfm.tasks.annotation.config import AnnotatorConfig


def annotator_from_official(
    path: str | Path,
    classes: list[str],
    config: AnnotatorConfig | None = None,
    *,
    reference: ad.AnnData | None = None,
    label_key: str | None = None,
    **overrides: Any,
) -> CellTypeAnnotator:
    """The official annotation model at `path` (`.ckpt` or `.pt`) as an annotator; `overrides`
    are ModelConfig fields (e.g. `n_heads=`). A labelled `reference` calibrates confidence and
    rejection (`CellTypeAnnotator.from_parts`); without one, nothing is called unknown."""
    model_config, encoder, head = load_official_annotation(path, **overrides)
    ann = CellTypeAnnotator.from_parts(CellFM(model_config, encoder), head, classes, config,
                                       reference=reference, label_key=label_key)
    ann.settings["source"] = str(path)
    return ann
