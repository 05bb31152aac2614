"""Training's process setup and model wrapping (DDP, or FSDP2 `fully_shard` per RetentionLayer).

Under `torchrun` (WORLD_SIZE in the environment) the process group is gloo on CPU and nccl on
CUDA; otherwise training runs in one process without a group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cellfm.distributed import join_process_group


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(device: str = "auto", parallel: str = "none") -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and parallel == "none":
        raise ValueError(f"{world} processes but parallel='none': set parallel = 'ddp' or 'fsdp' so "
                         "gradients are synchronised")
    if device == "auto":
        dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
    join_process_group(dev)
    if parallel != "none" and not dist.is_initialized():
        raise ValueError(f"parallel={parallel!r} needs a process group: launch with "
                         "`torchrun --nproc-per-node N -m cellfm.cli pretrain --config FILE` "
                         "(or set parallel='none')")
    return DistEnv(rank, world, local, dev)


def wrap_model(module: nn.Module, parallel: str, env: DistEnv) -> nn.Module:
    """Returns the module to call in the training step. FSDP2 shards `module` in place."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in module.encoder:
            fully_shard(layer)
        fully_shard(module)
        return module
    return module
