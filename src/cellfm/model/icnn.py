"""Input convex neural network (Amos et al. 2017), the potential CellOT learns (Bunne et al. 2023).

f(x) is convex in x when the weights acting on the hidden state are non-negative and the
activations are convex and non-decreasing; the optimal transport map of the squared Euclidean
cost is then the gradient of such a potential (Brenier), T(x) = ∇f(x). Knows only tensors.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ICNN(nn.Module):
    """z_1 = act(A_0 x)²; z_{k+1} = act(W_k z_k + A_k x); f(x) = W_L z_L + A_L x.

    `W_k` are kept non-negative by `clamp_()` after each optimiser step (CellOT's rule). No fixed
    |x|²/2 term: it would force every map's Jacobian >= I, so no map could contract the cells.
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (64, 64, 64), slope: float = 0.2) -> None:
        super().__init__()
        self.slope = slope
        self.A = nn.ModuleList([nn.Linear(dim, h) for h in hidden] + [nn.Linear(dim, 1)])
        sizes = list(zip(hidden, [*hidden[1:], 1], strict=True))
        self.W = nn.ModuleList([nn.Linear(a, b, bias=False) for a, b in sizes])
        for w in self.W:
            nn.init.uniform_(w.weight, 0.0, 1.0 / w.weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, dim) -> (B,)
        z = F.leaky_relu(self.A[0](x), self.slope) ** 2  # (B, h): a convex function of an affine map
        for A, W in zip(self.A[1:-1], self.W[:-1], strict=True):
            z = F.leaky_relu(W(z) + A(x), self.slope)
        return (self.W[-1](z) + self.A[-1](x)).squeeze(-1)

    def transport(self, x: torch.Tensor) -> torch.Tensor:
        """∇f(x), (B, dim); differentiable (training) or not (inference) as the caller's mode."""
        x = x.detach().requires_grad_(True) if not x.requires_grad else x
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self(x).sum(), x, create_graph=self.training)
        return grad

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project the hidden-state weights back to >= 0 (keeps f convex)."""
        for w in self.W:
            w.weight.clamp_(min=0.0)
