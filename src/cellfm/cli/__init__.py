"""The `cellfm` command line: a thin typer layer over the Python API.

Each command group lives in its own module and is mounted here by `_register`. Help is plain
text: option names, a metavar where a value is expected, no `<bool>` / `{input}` type placeholders.
"""

from __future__ import annotations

import re

import typer
from typer.core import TyperCommand

from cellfm import __version__
from cellfm.cellfm import PRETRAINED_DIR
from cellfm.cli import analysis, annotate, convert, corpus, demo, download, embed, perturb, pretrain, response
from cellfm.cli.console import make_console, one_line_warnings
from cellfm.config import PRESETS

_TYPE_WORDS = {"path": "PATH", "str": "TEXT", "int": "N", "float": "X", "bool": ""}


class Command(TyperCommand):
    """A typer command whose usage line reads `cellfm embed [OPTIONS] INPUT`, not `{INPUT}`."""

    def get_help(self, ctx) -> str:  # "--output <path>" -> "--output PATH", "--backed <bool>" -> "--backed"
        def word(m: re.Match) -> str:
            inner = m[2] or m[1]
            text = _TYPE_WORDS.get(inner.lower(), inner.upper()) + ("..." if m[2] else "")
            return text.ljust(len(m[0]))  # same width: the help columns stay aligned

        return re.sub(r"<(list\[(\w+)\]|\w+)>", word, super().get_help(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [re.sub(r"^\{(\w+)\}", r"\1", p) for p in super().collect_usage_pieces(ctx)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cellfm {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="cellfm",
    help="CellFM single-cell foundation model: embeddings, corpus building, pretraining and tasks.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """CellFM single-cell foundation model: embeddings, corpus building, pretraining and tasks."""


@app.command(cls=Command)
def info() -> None:
    """Show the version, the presets and the built-in models."""
    typer.echo(f"cellfm {__version__}")
    for name, preset in PRESETS.items():
        c = preset.config
        typer.echo(f"  preset {name:6s} d={c.d_model:5d} layers={c.n_layers:3d} heads={c.n_heads:3d} "
                   f"genes={c.n_genes}  {preset.description}")
    for d in sorted(PRETRAINED_DIR.glob("*/config.json")):
        typer.echo(f"  built-in model {d.parent.name}")


_registered = False


def _plain(sub: typer.Typer) -> typer.Typer:
    """Sub-apps get the same plain help and usage line as the top level."""
    sub.rich_markup_mode = None
    for info in sub.registered_commands:
        info.cls = Command
    return sub


def _register() -> None:
    """Mount the command groups (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    app.command("demo", cls=Command)(demo.demo)
    app.command("embed", cls=Command)(embed.embed)
    app.command("convert", cls=Command)(convert.convert)
    app.command("download", cls=Command)(download.download)
    app.command("pretrain", cls=Command)(pretrain.pretrain)
    app.add_typer(_plain(corpus.app), name="corpus", help="Build and inspect pretraining corpora.")
    app.add_typer(_plain(annotate.app), name="annotate", help="Cell type annotation.")
    app.command("perturb", cls=Command)(perturb.perturb)
    app.command("response", cls=Command)(response.response)
    for name in ("integrate", "gene_function", "gene_network", "evaluate"):
        app.command(name.replace("_", "-"), cls=Command)(getattr(analysis, name))


def main() -> None:
    """Entry point: every command prints Python warnings as one `warning: ...` line."""
    _register()
    with one_line_warnings(make_console()):
        app()
