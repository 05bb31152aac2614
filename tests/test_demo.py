"""`cellfm demo`: writes where it says (the user cache unless -o), prints chance and a next step."""

from __future__ import annotations

import anndata as ad
from typer.testing import CliRunner

from cellfm.cli import _register, app

_register()
runner = CliRunner()


def test_demo_default_output_is_the_cache_not_the_current_folder(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["demo", "--model", str(model_dir), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    expected = tmp_path / "cache/cellfm/demo/pbmc_example_cellfm.h5ad"
    assert str(expected) in r.output
    assert ad.read_h5ad(expected).obsm["X_cellfm"].shape == (300, 32)
    assert not list(tmp_path.glob("*.h5ad"))
    # chance = share of the largest labelled type (T_CD4: 90 of 297 labelled cells)
    chance = next(line for line in r.output.splitlines() if line.startswith("chance"))
    assert "T_CD4" in chance and f"{90 / 297:.3f}" in chance
    assert "next:" in r.output and "cellfm embed" in r.output
    # the untrained model of the same shape is scored beside it, as a kNN accuracy in [0, 1]
    rand = next(line for line in r.output.splitlines() if line.startswith("same model, random init"))
    assert 0 < float(rand.split()[-2]) <= 1


def test_demo_explicit_output_is_not_overwritten_silently(model_dir, tmp_path):
    out = tmp_path / "mine.h5ad"
    out.write_text("my data")
    r = runner.invoke(app, ["demo", "-o", str(out), "--model", str(model_dir), "--device", "cpu"])
    assert r.exit_code == 2 and "--overwrite" in r.output and out.read_text() == "my data"
    r = runner.invoke(app, ["demo", "-o", str(out), "--model", str(model_dir), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert ad.read_h5ad(out).n_obs == 300
