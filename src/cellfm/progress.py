"""The one progress bar of long work (embedding, caching, corpus builds): tqdm, on stderr, off
when `enabled` is False (tests, quiet runs, ranks other than 0)."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int | None, desc: str, *, unit: str = "cell", enabled: bool = True) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
