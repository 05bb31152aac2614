"""What the task commands share: the --model / --data-dir / --device / --threads options, loading
the model named by --model (and saying which one is used), tables and TSVs out. Errors go through
`cli.console` (one style: `error: ...`, exit 2 for bad arguments, 1 for bad data or models)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
import typer
from rich.console import Console
from rich.table import Table

from cellfm.cellfm import CellFM, load
from cellfm.cli.console import API_ERRORS, fail, first_line
from cellfm.config import PRESETS
from cellfm.io.read import read_cells
from cellfm.io.write import write_text

ModelOpt = Annotated[str, typer.Option(
    "--model", metavar="NAME|PATH", show_default=False,
    help="The model to use: an official release (cellfm-80m, cellfm-800m), a model folder or "
    "checkpoint, or cellfm-mini (a small PBMC-only demonstration model).")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", metavar="FOLDER", help="Evaluation data folder (default: CELLFM_DATA_DIR)."),
]
DeviceOpt = Annotated[str | None, typer.Option(
    metavar="DEVICE", show_default=False, help="cpu, cuda or auto (default: a GPU when there is one).")]
ThreadsOpt = Annotated[int | None, typer.Option(help="torch CPU threads (1 is fastest on a busy machine).")]


def set_threads(n: int | None) -> None:
    if n is not None:
        torch.set_num_threads(max(1, n))


def load_model(name: str) -> CellFM:
    """The model named by --model ("preset:NAME": a random model of a preset, for smoke runs); the
    command says which model it uses."""
    try:
        if name.startswith("preset:") and name[7:] in PRESETS:
            model = CellFM.from_preset(name[7:])
        else:
            model = load(name)
    except API_ERRORS as err:
        fail(f"could not load --model {name}: {first_line(err)}")
    typer.echo(f"model: {name} ({model!r})", err=True)
    return model


def read_input(path: Path):
    """An input AnnData named on the command line (.h5ad, 10x, loom), or a one-line error."""
    if not path.exists():
        fail(f"input {path} does not exist", 2)
    try:
        return read_cells(path)
    except (OSError, ValueError) as err:
        fail(first_line(err))


def print_table(df: pd.DataFrame, title: str) -> None:
    t = Table(title=title)
    for c in df.columns:
        t.add_column(str(c))
    for row in df.itertuples(index=False):
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    Console().print(t)


def write_tsv(df: pd.DataFrame, path: Path) -> None:
    write_text(path, df.to_csv(sep="\t", index=False))
