"""`cellfm download 80m|800m`: fetch an official release from the Hugging Face Hub and convert it
once into the cache (see `cellfm.checkpoints.hub`)."""

from __future__ import annotations

from pathlib import Path

import typer

from cellfm.checkpoints.hub import DownloadError, default_cache_dir, download_official, official_weights
from cellfm.cli.console import fail, run_cli


def download(
    model: str = typer.Argument(..., help="Official release: 80m or 800m."),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Cache folder (default: $CELLFM_CACHE or ~/.cache/cellfm)."),
    revision: str | None = typer.Option(
        None, "--revision", help="Hub revision (commit, branch or tag) instead of the pinned one."),
    force: bool = typer.Option(False, "--force", help="Download and convert again even if cached."),
    keep_checkpoint: bool = typer.Option(
        False, "--keep-checkpoint", help="Keep the downloaded .ckpt beside the converted model."),
) -> None:
    """Download official CellFM weights (CC BY-NC-ND 4.0, for use on this machine) and convert them."""

    with run_cli():
        try:
            spec = official_weights(model)
        except ValueError as err:
            fail(str(err), 2)
        typer.echo(f"{spec.description}: {spec.repo_id}/{spec.filename}")
        try:
            folder = download_official(spec.name, cache_dir, revision=revision, force=force,
                                       keep_checkpoint=keep_checkpoint)
        except DownloadError as err:
            fail(str(err), 1)
        typer.echo(f"ready: {folder}")
        if cache_dir is None or cache_dir.expanduser() == default_cache_dir():
            typer.echo(f'use it with cellfm.load("{spec.name}") or --model {spec.name}')
        else:
            typer.echo(f"use it with cellfm.load(\"{folder}\") or --model {folder} "
                       f"(or set CELLFM_CACHE={cache_dir} to use the name {spec.name})")
