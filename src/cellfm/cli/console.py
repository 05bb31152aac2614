"""How CLI commands talk to the terminal: one-line errors and warnings, CLI wording, Ctrl-C.

`run_cli()` wraps a command body: API errors name CLI flags (`cellfm.wording`) and end the command
with one `error: ...` line, exit 2 for a bad argument (`BAD_ARGUMENTS`: `UsageError`, a named path
that is missing or taken) and 1 for bad data or models (`API_ERRORS`); `fail(...)` does the same for
the CLI's own checks; Ctrl-C ends it with one line and exit 130. No traceback reaches the user.
`one_line_warnings` prints Python warnings as `warning: ...` without source paths.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from cellfm.wording import UsageError, cli_wording

# what the API raises for bad input, a bad model or a missing optional extra (not for our bugs)
API_ERRORS = (OSError, ValueError, KeyError, ImportError)
# of those, the ones that mean a bad argument: a bad value, a named path that is missing or taken
BAD_ARGUMENTS = (UsageError, FileNotFoundError, FileExistsError, IsADirectoryError)


class Failure(Exception):
    """Ends a command with a one-line message and an exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> NoReturn:
    raise Failure(message, code)


def first_line(err: BaseException) -> str:
    """The message of `err` in one line (KeyError's repr quotes stripped)."""
    text = str(err.args[0] if isinstance(err, KeyError) and err.args else err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def make_console() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)  # one line per message, never wrapped


@contextmanager
def run_cli() -> Iterator[Console]:
    console = make_console()
    try:
        with cli_wording():
            yield console
    except Failure as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}")
        raise typer.Exit(err.code) from None
    except API_ERRORS as err:
        console.print(f"[bold red]error:[/] {escape(first_line(err))}")
        raise typer.Exit(2 if isinstance(err, BAD_ARGUMENTS) else 1) from None
    except KeyboardInterrupt:
        console.print("[bold red]error:[/] interrupted (Ctrl-C) before any output was written")
        raise typer.Exit(130) from None


@contextmanager
def one_line_warnings(console: Console) -> Iterator[None]:
    """Show warnings as `warning: message` (no category, file or line); drop library deprecations."""
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
