"""Markdown pieces the report's sections share: a table without the tabulate dependency and a
figure link that says how to get the figure when matplotlib is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellfm.evaluation.plots import INSTALL_HINT


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub Markdown table; tiny numbers in scientific notation so they do not print as 0."""

    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "nan" if np.isnan(v) else (f"{v:.2e}" if 0 < abs(v) < 10**-digits else f"{v:.{digits}f}")
        return str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def figure_link(path: Path | None, alt: str) -> str:
    """An image link, or how to install matplotlib when the figure could not be drawn."""
    if path is None:
        return f"_(no figure: matplotlib is not installed; `{INSTALL_HINT}`)_"
    return f"![{alt}]({path.name})"
