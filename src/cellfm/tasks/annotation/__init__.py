"""Cell type annotation: `CellTypeAnnotator(model, AnnotatorConfig(...))`, `fit` on a labelled
reference, `predict` a query, `evaluate_annotation` against two baselines.

Modules, in the order of the data path: `config` (settings), `reference` (labels, split,
trainable encoder copy), `states` (encoder outputs cached once), `heads` and `selection` (the
candidate heads, trained and compared), `training` (epochs, early stopping), `calibration` and
`open_set` (confidence and rejection), `annotator` (the user object), `persist` (files),
`evaluate` (scores and baselines), `official` (the authors' annotation checkpoint). The heads
themselves (`torch.nn` modules) are in `cellfm.model`.
"""

from __future__ import annotations

from cellfm.tasks.annotation.annotator import UNKNOWN, CellTypeAnnotator
from cellfm.tasks.annotation.config import AnnotatorConfig
from cellfm.tasks.annotation.evaluate import AnnotationEvaluation, compare_on_query, evaluate_annotation
from cellfm.tasks.annotation.official import annotator_from_official

__all__ = [
    "UNKNOWN",
    "AnnotationEvaluation",
    "AnnotatorConfig",
    "CellTypeAnnotator",
    "annotator_from_official",
    "compare_on_query",
    "evaluate_annotation",
]
