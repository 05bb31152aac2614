"""Resumable training checkpoints with `torch.distributed.checkpoint` (DCP).

Layout: out_dir/checkpoints/step_0000100/ holds the DCP files of {model, optim} (sharded for
FSDP2: each rank writes its own shards) and `trainer_rank{r}.pt` per rank (step, scheduler, RNG
states, loader position). A checkpoint is written into `step_X.tmp/` and renamed once every rank
has finished, so a killed run never leaves a half-written `step_X/`; resume takes the newest.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from cellfm.distributed import barrier
from cellfm.training.distributed import DistEnv

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, module, optimizer, trainer_state: dict, env: DistEnv,
                    keep: int = 2) -> Path:
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(module, optimizer)
    with warnings.catch_warnings():  # single process: DCP warns that it assumes no process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(trainer_state, tmp / f"trainer_rank{env.rank}.pt")
    barrier()
    if env.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, module, optimizer, env: DistEnv) -> dict:
    """Restore model and optimizer in place; returns this rank's trainer state."""
    trainer_file = path / f"trainer_rank{env.rank}.pt"
    if not trainer_file.is_file():
        raise FileNotFoundError(f"{trainer_file} missing: {path} was written with a different number "
                                "of processes; resume with the same world size")
    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return torch.load(trainer_file, weights_only=False)
