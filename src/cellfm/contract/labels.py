"""The one rule for unlabelled cells: a label that is missing or says "no label" in any of the
spellings data sets use ("", "nan", "?", "unknown", "unassigned", ...), compared case-blind.
Annotation, the evaluation data sets and the report's figures all use it."""

from __future__ import annotations

import numpy as np
import pandas as pd

UNLABELLED = frozenset({"", "nan", "na", "none", "?", "unknown", "unlabelled", "unlabeled", "unassigned"})


def is_unlabelled(labels: pd.Series | np.ndarray | list) -> np.ndarray:
    """(n,) bool: True where a label is missing or one of the `UNLABELLED` spellings."""
    s = pd.Series(labels, dtype=object)
    return (s.isna() | s.astype(str).str.strip().str.lower().isin(UNLABELLED)).to_numpy()
