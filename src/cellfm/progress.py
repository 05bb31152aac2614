"""The one progress bar of long work (embedding, caching, corpus builds): tqdm, on stderr, off
when `enabled` is False (tests, quiet runs, ranks other than 0). `progress_bar` is updated by
hand; `progress_iter` wraps an iterable."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm.auto import tqdm


def progress_bar(total: int | None, desc: str, *, unit: str = "cell", enabled: bool = True) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def progress_iter(items: Iterable, desc: str, *, unit: str, total: int | None = None,
                  enabled: bool = True) -> Iterable:
    return tqdm(items, total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
