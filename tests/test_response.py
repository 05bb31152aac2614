"""CellOT on simulated cells whose transport map is known."""

from __future__ import annotations

import numpy as np
import torch

from cellfm.model.icnn import ICNN
from cellfm.tasks.cellot import CellOTConfig, fit_cellot, mmd_rbf


def test_icnn_is_convex_along_random_segments():
    torch.manual_seed(0)
    f = ICNN(5, (16, 16))
    with torch.no_grad():
        for w in f.W:
            w.weight.normal_()
    f.clamp_()
    a, b = torch.randn(200, 5), torch.randn(200, 5)
    t = torch.rand(200)
    mid = f(t[:, None] * a + (1 - t[:, None]) * b)
    assert (mid <= t * f(a) + (1 - t) * f(b) + 1e-5).all()


def test_cellot_recovers_a_known_map_better_than_the_mean_shift():
    """Control ~ N(0, I); treated ~ N(2, A²) with A symmetric positive definite, some directions
    contracted and some stretched: the OT map is x -> A x + 2, which no mean shift can express."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    d = 10
    Q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    A = Q @ np.diag(np.linspace(0.3, 2.5, d)) @ Q.T
    x, y = rng.normal(size=(1500, d)), rng.normal(size=(1500, d)) @ A + 2.0
    x_train, x_test, y_train = x[:1000], x[1000:], y[:1000]
    cellot = fit_cellot(x_train, y_train, CellOTConfig(hidden=(32, 32)))
    pred = cellot.predict(x_test)
    shift = x_test + (y_train.mean(0) - x_train.mean(0))
    truth = x_test @ A + 2.0
    assert np.mean((pred - truth) ** 2) < 0.3 * np.mean((shift - truth) ** 2)
    held_out = y[1000:]
    assert mmd_rbf(pred, held_out) < 0.5 * mmd_rbf(shift, held_out)
    assert mmd_rbf(held_out[:250], held_out[250:]) < mmd_rbf(shift, held_out)
