"""`cellfm pretrain --config FILE`: masked-value pretraining, as one process or under torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellfm.training import TrainConfig
from cellfm.training import pretrain as run


def pretrain(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML file of TrainConfig fields.")],
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Override max_steps.")] = None,
    out_dir: Annotated[str | None, typer.Option("--out-dir", help="Override out_dir.")] = None,
    stop_after_steps: Annotated[int | None, typer.Option(
        "--stop-after-steps", help="Stop after this step as if killed (a checkpoint is written).")] = None,
) -> None:
    """Pretrain (or continue pretraining) on a corpus built by `cellfm corpus build`.

    Resumes from the newest checkpoint in OUT_DIR/checkpoints if there is one. Several processes:
    `torchrun --nproc-per-node N -m cellfm.cli pretrain --config FILE` with parallel = "ddp" or "fsdp".
    """

    overrides = {k: v for k, v in {"max_steps": max_steps, "out_dir": out_dir,
                                   "stop_after_steps": stop_after_steps}.items() if v is not None}
    try:
        cfg = TrainConfig.from_toml(config, **overrides)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err), param_hint="--config") from err
    model_dir = run(cfg)
    if model_dir.is_dir():
        typer.echo(f"model: {model_dir}")
