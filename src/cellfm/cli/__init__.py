"""The `cellfm` command line: a thin typer layer over the Python API.

Each command group lives in its own module; heavy imports (torch, anndata) happen inside the
command functions so that `cellfm --help` starts fast.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="cellfm",
    help="CellFM single-cell foundation model: embeddings, corpus building, pretraining and tasks.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def info() -> None:
    """Show the version, the presets and the built-in models."""
    from cellfm import __version__
    from cellfm.cellfm import PRETRAINED_DIR
    from cellfm.config import PRESETS

    typer.echo(f"cellfm {__version__}")
    for name, preset in PRESETS.items():
        c = preset.config
        typer.echo(f"  preset {name:6s} d={c.d_model:5d} layers={c.n_layers:3d} heads={c.n_heads:3d} "
                   f"genes={c.n_genes}  {preset.description}")
    for d in sorted(PRETRAINED_DIR.glob("*/config.json")):
        typer.echo(f"  built-in model {d.parent.name}")


def _register() -> None:
    import importlib

    def module(name: str):
        try:
            return importlib.import_module(f"cellfm.cli.{name}")
        except ModuleNotFoundError as err:  # a command group not installed in this build
            if err.name != f"cellfm.cli.{name}":
                raise
            return None

    if (m := module("demo")) is not None:
        app.command("demo")(m.demo)
    if (m := module("embed")) is not None:
        app.command("embed")(m.embed)
    if (m := module("convert")) is not None:
        app.command("convert")(m.convert)
    if (m := module("download")) is not None:
        app.command("download")(m.download)
    if (m := module("corpus")) is not None:
        app.add_typer(m.app, name="corpus", help="Build and inspect pretraining corpora.")
    if (m := module("pretrain")) is not None:
        app.command("pretrain")(m.pretrain)
    if (m := module("tasks")) is not None:
        app.add_typer(m.annotate_app, name="annotate", help="Cell type annotation.")
        for name in ("integrate", "perturb", "gene_function", "gene_network", "evaluate"):
            if hasattr(m, name):
                app.command(name.replace("_", "-"))(getattr(m, name))


def main() -> None:
    _register()
    app()
