"""`cellfm convert SRC -o DIR`: an official checkpoint to our folder format, once."""

from __future__ import annotations

from pathlib import Path

import typer


def convert(
    src: Path = typer.Argument(..., help="Official checkpoint: MindSpore .ckpt or CellFM-torch .pt"),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write (config.json, ...)."),
    n_heads: int | None = typer.Option(None, help="Heads; needed only when d_model != 1536."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output folder."),
) -> None:
    """Convert an official CellFM checkpoint into a cellfm model folder."""
    from cellfm.checkpoints import convert_checkpoint

    if not src.is_file():
        typer.echo(f"error: {src} does not exist", err=True)
        raise typer.Exit(2)
    try:
        model = convert_checkpoint(src, output, n_heads=n_heads, overwrite=overwrite)
    except (ValueError, FileExistsError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(f"{model!r}\nwrote {output}")
