"""How CLI commands talk to the terminal: one-line errors and warnings, CLI wording, Ctrl-C.

`run_cli()` wraps a command body: API errors name CLI flags (`cellfm.wording`), `fail(...)` ends
the command with `error: ...` and an exit code, Ctrl-C ends it with one line and exit 130.
`one_line_warnings` prints Python warnings as `warning: ...` without source paths.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer


class Failure(Exception):
    """Ends a command with a one-line message and an exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> NoReturn:
    raise Failure(message, code)


def make_console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True, highlight=False)  # one line per message, never wrapped


@contextmanager
def run_cli() -> Iterator[object]:
    from rich.markup import escape

    from cellfm.wording import cli_wording

    console = make_console()
    try:
        with cli_wording():
            yield console
    except Failure as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}")
        raise typer.Exit(err.code) from None
    except KeyboardInterrupt:
        console.print("[bold red]error:[/] interrupted (Ctrl-C) before any output was written")
        raise typer.Exit(130) from None


@contextmanager
def one_line_warnings(console) -> Iterator[None]:
    """Show warnings as `warning: message` (no category, file or line); drop library deprecations."""
    from rich.markup import escape

    def show(message, category, filename, lineno, file=None, line=None):
        console.print(f"[yellow]warning:[/] {escape(str(message).strip().splitlines()[0])}")

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # cellfm refuses duplicated genes itself, with CLI advice; anndata's advice is Python
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        warnings.filterwarnings("ignore", message="Observation names are not unique")
        warnings.showwarning = show
        yield
