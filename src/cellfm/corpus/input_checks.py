"""Checks that an input holds human raw counts, with the reason when it does not.

CellFM is pretrained on raw UMI/read counts of human cells; normalised or log-transformed values
and mouse data would silently poison a corpus, so such files are rejected, not converted.
"""

from __future__ import annotations

import re

import numpy as np
import scipy.sparse as sp

_MOUSE_CASE = re.compile(r"^[A-Z][a-z][a-z0-9]*$")  # Actb, Cd74, Gm12345
_HUMAN_CASE = re.compile(r"^[A-Z0-9][A-Z0-9-]*[A-Z0-9]$")  # ACTB, CD74, HLA-DRA


def looks_like_raw_counts(m: sp.spmatrix | np.ndarray | None) -> tuple[bool, str]:
    """Raw counts are finite, non-negative and whole numbers. Returns (ok, reason if not)."""
    if m is None:
        return False, "no cells"
    data = m.data if sp.issparse(m) else np.asarray(m).ravel()
    if data.size == 0:
        return True, ""
    if not np.isfinite(data).all():
        return False, "non-finite values"
    if (data < 0).any():
        return False, "negative values (scaled or corrected data?)"
    frac = np.abs(data - np.round(data)) > 1e-6
    if frac.any():
        return False, (f"non-integer values ({frac.mean():.0%} of non-zeros; normalised or "
                       "log-transformed?)")
    return True, ""


def mouse_case_fraction(names: np.ndarray) -> float:
    """Fraction of gene symbols written in mouse case (Actb) among those in either case style."""
    mouse = sum(1 for n in names if _MOUSE_CASE.match(str(n)))
    human = sum(1 for n in names if _HUMAN_CASE.match(str(n)))
    return mouse / max(1, mouse + human)
