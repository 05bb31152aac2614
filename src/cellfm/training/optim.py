"""Optimizer and learning-rate schedule of the official pretraining.

Official `utils.set_weight_decay` puts parameters whose name contains 'emb', 'layernorm' or
'bias' into a group without weight decay; our names differ ('post_norm1', 'cls_token'), so the
rule here is: decay only matrices (ndim >= 2) that are not embedding tables or tokens. The
official optimizer is MindSpore `nn.Adam` with that grouping, i.e. L2 decay added to the
gradient (torch `Adam(weight_decay=...)`), not decoupled AdamW.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_NO_DECAY_NAMES = ("emb", "norm", "bias", "cls_token")


def decays(name: str, param: torch.Tensor) -> bool:
    return param.ndim >= 2 and not any(s in name.lower() for s in _NO_DECAY_NAMES)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, other = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else other).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def warmup_cosine(step: int, *, start_lr: float, lr: float, min_lr: float, warmup_steps: int,
                  decay_steps: int) -> float:
    """Learning rate at `step` (0-based): linear warmup start_lr -> lr, half cosine lr -> min_lr."""
    if step < warmup_steps:
        return start_lr + step / warmup_steps * (lr - start_lr)
    p = min(step - warmup_steps, decay_steps) / decay_steps
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * p))


def make_optimizer(module: nn.Module, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Adam over `param_groups` and a LambdaLR that sets the absolute warmup-cosine rate."""
    opt = torch.optim.Adam(param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    def factor(step: int) -> float:  # LambdaLR multiplies the base lr (= cfg.lr) by this
        return warmup_cosine(step, start_lr=cfg.start_lr, lr=cfg.lr, min_lr=cfg.min_lr,
                             warmup_steps=cfg.warmup_steps, decay_steps=cfg.total_decay_steps) / cfg.lr

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def clip_gradients(parameters, max_norm: float, mode: str = "per_tensor") -> torch.Tensor:
    """Clip gradients in place; returns the global gradient norm before clipping (for the log).

    ``per_tensor`` is the official rule (MindSpore `ClipByNorm` applied to each gradient:
    g * max_norm / max(|g|, max_norm)); ``global`` is torch's `clip_grad_norm_`. Works on FSDP2
    sharded gradients (DTensor): a sharded norm is reduced across ranks by `full_tensor()`.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if mode == "global":
        norms = [_full(g.norm()) for g in grads]
        total = torch.stack([n.float() for n in norms]).norm()
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            _local(g).mul_(scale.to(g.dtype))
        return total
    norms = [_full(g.norm()) for g in grads]
    for g, n in zip(grads, norms, strict=True):
        _local(g).mul_((max_norm / torch.clamp(n, min=max_norm)).to(g.dtype))
    return torch.stack([n.float() for n in norms]).norm()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's value on every rank (reduces a sharded norm); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (in-place edits reach the DTensor); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t
