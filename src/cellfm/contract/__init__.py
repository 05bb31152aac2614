"""The input contract: AnnData -> one checked `CellInput` (counts judged, genes matched, empty
cells found) -> tokenized batches. Every workflow that reads cells enters through `setup_cells`.

Names are resolved on first use, so that importing one submodule (the corpus readers ask
`contract.counts`) does not import the others."""

from __future__ import annotations

from cellfm.lazy_exports import lazy_exports

_EXPORTS = {
    "CellInput": "cellfm.contract.setup",
    "setup_cells": "cellfm.contract.setup",
    "check_counts": "cellfm.contract.counts",
    "judge_counts": "cellfm.contract.counts",
    "raw_count_problem": "cellfm.contract.counts",
    "UNLABELLED": "cellfm.contract.labels",
    "is_unlabelled": "cellfm.contract.labels",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
