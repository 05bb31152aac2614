"""The process group shared by training and embedding under `torchrun`: nccl on CUDA, gloo on
CPU; without torchrun every helper here is a no-op, so one code path serves 1 and N processes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def join_process_group(dev: torch.device) -> bool:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) when launched by torchrun.
    True when this call created the group (the caller then destroys it)."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return False
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=int(os.environ.get("RANK", "0")),
                            world_size=int(os.environ["WORLD_SIZE"]))
    return True


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) in one process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_ranks(obj: object) -> list:
    """`obj` of every process in rank order (an all-gather; [obj] in one process)."""
    if not is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
