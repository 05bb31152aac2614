"""`cellfm convert SRC -o DIR`: an official checkpoint to our folder format, once."""

from __future__ import annotations

from pathlib import Path

import typer

from cellfm.checkpoints import CheckpointFormatError, convert_checkpoint, read_model_folder
from cellfm.cli.console import fail, run_cli


def convert(
    src: Path = typer.Argument(..., help="Official checkpoint: MindSpore .ckpt or CellFM-torch .pt"),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write (config.json, ...)."),
    n_heads: int | None = typer.Option(None, "--n-heads", help="Heads; needed only when d_model != 1536."),
    pad_zero: bool | None = typer.Option(
        None, "--pad-zero/--no-pad-zero",
        help="Official pad_zero setting (default: from the release's official config, else the official "
             "default Config: on)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
) -> None:
    """Convert an official CellFM checkpoint into a cellfm model folder."""

    overrides = {k: v for k, v in (("n_heads", n_heads), ("pad_zero", pad_zero)) if v is not None}
    with run_cli():
        if not src.is_file():
            fail(f"{src} does not exist", 2)
        try:
            folder = convert_checkpoint(src, output, overwrite=overwrite, **overrides)
        except (CheckpointFormatError, ValueError, FileExistsError) as err:
            fail(str(err), 2)
        c = read_model_folder(folder)[0]
        typer.echo(f"d_model={c.d_model} n_layers={c.n_layers} n_heads={c.n_heads} pad_zero={c.pad_zero} "
                   f"add_zero={c.add_zero} vocabulary={c.vocabulary}\nwrote {folder}")
