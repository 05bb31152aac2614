"""Temperature scaling of the annotator's logits (Guo et al. 2017) and the calibration error that
checks it. One scalar divides every logit, so the argmax never changes; only confidences do."""

from __future__ import annotations

import torch
from torch import nn


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> float:
    """The T > 0 minimising the validation NLL of softmax(logits / T), clipped to [0.05, 20]."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([log_t], lr=0.05)
    logits, labels = logits.detach().float(), labels.long()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        opt.step()
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """|accuracy - confidence| averaged over equal-width confidence bins, weighted by their size."""
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    ece = torch.zeros(())
    edges = torch.linspace(0, 1, n_bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.float().mean() * (correct[sel].mean() - conf[sel].mean()).abs()
    return float(ece)
