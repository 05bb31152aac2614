"""How error messages name a setting: `layer='counts'` to Python callers, `--layer counts` on the CLI.

A check formats its advice with `arg(...)` when it raises; the CLI runs the API inside
`cli_wording()`, so one check speaks the words of whichever interface the user typed. This
module holds wording only, no checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CLI: ContextVar[bool] = ContextVar("cellfm_cli_wording", default=False)
_NO_VALUE = object()


def in_cli() -> bool:
    """True while a CLI command runs the API (messages then name flags, not arguments)."""
    return _CLI.get()


@contextmanager
def cli_wording() -> Iterator[None]:
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def arg(name: str, value: object = _NO_VALUE, *, placeholder: str | None = None) -> str:
    """`arg("layer", "counts")` -> "layer='counts'" (Python) or "--layer counts" (CLI).

    `value=True` names a switch (`allow_non_integer=True` / `--allow-non-integer`); `placeholder`
    stands for a value the user picks (`gene_key=<column>` / `--gene-key COLUMN`).
    """
    if in_cli():
        flag = "--" + name.replace("_", "-")
        if value is True:
            return flag
        if placeholder is not None:
            return f"{flag} {placeholder.upper()}"
        return flag if value is _NO_VALUE else f"{flag} {value}"
    if placeholder is not None:
        return f"{name}=<{placeholder}>"
    return name if value is _NO_VALUE else f"{name}={value!r}"


class UsageError(ValueError):
    """A bad argument (a value the caller chose), as opposed to bad data or a bad model: the CLI
    reports it with exit code 2, like a bad flag."""
