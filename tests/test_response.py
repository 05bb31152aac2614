"""CellOT on simulated cells whose transport map is known; `cellfm response` on Papalexi cells."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cellfm.cli import _register, app
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


# --- `cellfm response` on a Papalexi subset ------------------------------------------------------

PAPALEXI = "papalexi2021_eccite_sceptre/papalexi2021_thp1_lowmoi_299genes.h5ad"
runner = CliRunner()
_register()


@pytest.fixture(scope="module")
def screen_path(shared_data, tmp_path_factory) -> Path:
    """Control cells and two strong IFN-γ-pathway knock-outs, 120 cells each, three replicates."""
    full = ad.read_h5ad(shared_data / PAPALEXI)
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(np.flatnonzero(full.obs.condition == c), 120, replace=False)
                           for c in ("ctrl", "IFNGR1+ctrl", "STAT1+ctrl")])
    path = tmp_path_factory.mktemp("screen") / "screen.h5ad"
    full[np.sort(rows)].copy().write_h5ad(path)
    return path


def _invoke(args: list[str]):
    result = runner.invoke(app, ["response", *args])
    return result, result.output


@pytest.mark.parametrize("case, code, pattern", [
    ("missing_column", 1, r"no column 'nope'.*--condition-key COLUMN"),
    ("unknown_control", 2, r"never equals 'NT'.*--control NAME"),
    ("unknown_treated", 2, r"no condition 'XYZ\+ctrl'.*--treated CONDITION"),
    ("missing_group", 1, r"no column 'donor'.*--group-key COLUMN"),
    ("lognormalised", 1, r"raw"),
    ("missing_model", 2, r"--model is required"),
])
def test_response_cli_refuses_bad_input(screen_path, tmp_path, case, code, pattern):
    source = screen_path
    args = ["--treated", "IFNGR1+ctrl"]
    if case == "missing_column":
        args += ["--condition-key", "nope"]
    elif case == "unknown_control":
        args += ["--control", "NT"]
    elif case == "unknown_treated":
        args = ["--treated", "XYZ+ctrl"]
    elif case == "missing_group":
        args += ["--group-key", "donor"]
    elif case == "lognormalised":
        a = ad.read_h5ad(screen_path)
        a.X = np.log1p(a.X.toarray() / a.X.sum(1).A * 1e4)
        source = tmp_path / "log.h5ad"
        a.write_h5ad(source)
    out = tmp_path / "out"
    model = [] if case == "missing_model" else ["--model", "preset:tiny"]
    result, text = _invoke(["--input", str(source), *model, "-o", str(out), *args])
    assert result.exit_code == code, text
    assert "Traceback" not in text and not isinstance(result.exception, Exception | KeyboardInterrupt)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert re.search(pattern, errors[0]), errors[0]
    assert not re.search(r"\b(condition_key|control|treated|group_key)=", text), text
    assert not out.exists(), "output written despite the error"


def test_response_cli_end_to_end(screen_path, tmp_path):
    """A small run: every file written, the TSV's columns, and on a strong knock-out (IFNGR1) the
    mean shift is closer to the observed cells than no change, wherever no decoder intervenes."""
    out = tmp_path / "out"
    result, text = _invoke(["--input", str(screen_path), "--model", "preset:tiny", "-o", str(out),
                            "--treated", "IFNGR1+ctrl", "--group-key", "bio_rep", "--size-factor-key",
                            "response_n_umis", "--iters", "20", "--n-pcs", "10", "--threads", "1"])
    assert result.exit_code == 0, text
    scores = pd.read_csv(out / "scores.tsv", sep="\t")
    assert list(scores.columns[:5]) == ["method", "space", "setting", "held_out", "treated"]
    assert {"mmd", "l2_mean", "pearson_shift", "mmd_expr", "l2_mean_expr", "pearson_shift_expr"} <= set(
        scores.columns)
    assert set(scores.method) == {"identity", "mean shift", "CellOT"}
    assert set(scores.space) == {"cellfm", "pca", "expression"}
    assert set(scores.setting) == {"iid", "ood"}
    assert set(scores.held_out[scores.setting == "ood"]) == {"rep_1", "rep_2", "rep_3"}
    expr = scores[scores.space == "expression"].groupby(["setting", "method"])["mmd"].mean()
    for setting in ("iid", "ood"):  # ood: mean over the replicates (~40 held-out cells each)
        assert expr[setting, "identity"] >= expr[setting, "mean shift"], expr
    assert "| method | space |" in (out / "scores.md").read_text()
    pred = ad.read_h5ad(out / "predicted.h5ad")
    assert pred.n_vars == 299 and {"method", "space", "setting", "source_cell"} <= set(pred.obs.columns)
    assert len(pred) == scores.n_source.sum()
