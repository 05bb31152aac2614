"""embed's bad-input guarantees on every command that reads a user's cells.

The inputs of `test_embed_bad_input` (real PBMC counts made bad in one way) go through
`annotate fit`, `annotate predict`, `integrate --input`, `perturb --input` and `response --input`.
All of them read cells through the one contract (`cellfm.contract`), so each case must end with
the same verdict everywhere: its exit code, exactly one `error:` line naming the problem, no
traceback, the input unchanged and no output written. (`corpus build` skips a bad file and records
why in report.tsv instead: `test_corpus_build.py`; probe files: `test_probe.py`.)
"""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from test_embed_bad_input import N_CELLS, build, sha
from typer.testing import CliRunner

from cellfm.cli import _register, app
from cellfm.datasets import EXAMPLE_PATH

_register()
runner = CliRunner()

# case -> (exit code, what the one error line must say, whatever the command)
CASES = {
    "log1p": (1, r"log-transformed"),
    "cpm": (1, r"normalised to a fixed total"),
    "nan": (1, r"NaN or infinite"),
    "negative": (1, r"negative values"),
    "duplicates": (1, r"occur more than once"),
    "mouse_symbols": (1, r"mouse"),
    "unknown_ids": (1, r"none of the .* genes"),
    "counts_in_layer": (1, r"raw counts found in layers\['counts'\]"),
    "zero_cells": (1, r"no cells"),
    "truncated": (1, r"could not read .*truncated"),
    "missing_input": (2, r"does not exist"),
}
COMMANDS = ["annotate_fit", "annotate_predict", "integrate", "perturb", "response"]


@pytest.fixture(scope="module")
def cells() -> ad.AnnData:
    """The first 40 bundled PBMCs with the obs columns every command asks for."""
    adata = ad.read_h5ad(EXAMPLE_PATH)[:N_CELLS].copy()
    adata = adata[:, np.asarray((adata.X != 0).sum(0)).ravel() > 0].copy()
    half = np.arange(N_CELLS) % 2
    adata.obs["label"] = np.where(half == 0, "T", "B")
    adata.obs["batch"] = np.where(np.arange(N_CELLS) < N_CELLS // 2, "b1", "b2")
    adata.obs["condition"] = np.where(half == 0, "ctrl", "STAT1+ctrl")
    return adata


@pytest.fixture(scope="module")
def annotator(cells, model_dir, tmp_path_factory) -> Path:
    """A fitted annotator (tiny model, 1 epoch) for `annotate predict`."""
    folder = tmp_path_factory.mktemp("ann")
    good = folder / "ref.h5ad"
    cells.write_h5ad(good)
    result = runner.invoke(app, ["annotate", "fit", str(good), "--label-key", "label",
                                 "-o", str(folder / "a"), "--model", str(model_dir), "--max-epochs", "1",
                                 "--min-cells-per-class", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    return folder / "a"


def command(name: str, source: Path, out: Path, model: str, annotator: Path | None, data: Path) -> list[str]:
    if name == "annotate_fit":
        return ["annotate", "fit", str(source), "--label-key", "label", "-o", str(out), "--model", model,
                "--max-epochs", "1", "--min-cells-per-class", "2"]
    if name == "annotate_predict":
        return ["annotate", "predict", str(source), "--model", str(annotator), "-o", str(out / "q.h5ad")]
    if name == "integrate":
        return ["integrate", "--input", str(source), "--batch-key", "batch", "--label-key", "label", "-o",
                str(out), "--model", model, "--scvi-epochs", "0", "--no-harmony"]
    if name == "perturb":
        return ["perturb", "--input", str(source), "-o", str(out), "--model", model, "--method", "embedding",
                "--data-dir", str(data)]
    return ["response", "--input", str(source), "--treated", "STAT1+ctrl", "-o", str(out), "--model", model]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_refuses_bad_input_alike(name, case, cells, model_dir, annotator, shared_data,
                                               tmp_path):
    code, pattern = CASES[case]
    source, _ = build(case, cells, tmp_path, shared_data)
    if case == "missing_input":
        source = tmp_path / "nope.h5ad"
    out = tmp_path / "out"
    before = sha(source)

    result = runner.invoke(app, [*command(name, source, out, str(model_dir),
                                          annotator if name == "annotate_predict" else None, shared_data),
                                 "--threads", "1"])

    text = result.output
    assert result.exit_code == code, text
    assert "Traceback" not in text and not isinstance(result.exception, Exception | KeyboardInterrupt)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), text
    assert sha(source) == before, "the input file changed"
    written = out.exists() and any(p.is_file() for p in out.rglob("*"))
    assert not written, "output written despite the error"
