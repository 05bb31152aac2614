"""`cellfm embed` on bad input: the matrix of what a new user hits.

Every case runs the real CLI (typer CliRunner on the `cellfm` app) on a small slice of the bundled
PBMCs (real 10x counts) made bad in one way, with the `tiny` model. Each asserts the exit code,
one `error:` line that names the problem and the CLI flag that fixes it (never Python argument
syntax), no traceback, and that the input file is byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from typer.testing import CliRunner

import cellfm
import cellfm.contract.setup
import cellfm.io.stream_writer
from cellfm.cli import _register, app
from cellfm.datasets import EXAMPLE_PATH

_register()
runner = CliRunner()
N_CELLS = 40
PYTHON_WORDING = re.compile(r"\b(layer|gene_key|empty|device|allow_non_integer)=")


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """--threads sets torch's process-wide thread count: give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cells() -> ad.AnnData:
    """Real raw counts: the first 40 bundled PBMCs, genes expressed in them."""
    adata = ad.read_h5ad(EXAMPLE_PATH)[:N_CELLS].copy()
    return adata[:, np.asarray((adata.X != 0).sum(0)).ravel() > 0].copy()


def lognorm(X: sp.csr_matrix) -> sp.csr_matrix:
    X = sp.csr_matrix(X, dtype=np.float32)
    X = sp.diags(1e4 / np.asarray(X.sum(1)).ravel()) @ X
    return X.log1p().tocsr()


def with_value(X, value: float) -> sp.csr_matrix:
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    X.data[7] = value
    return X


def build(case: str, a: ad.AnnData, folder: Path, shared_data: Path | None) -> tuple[Path, list[str]]:
    """Write the input of `case` under `folder`; return (input path, extra CLI arguments)."""
    a = a.copy()
    args: list[str] = []
    path = folder / "in.h5ad"
    if case == "log1p":
        a.X = lognorm(a.X)
    elif case == "cpm":
        X = sp.csr_matrix(a.X, dtype=np.float64)
        a.X = sp.diags(1e6 / np.asarray(X.sum(1)).ravel()) @ X
    elif case in ("nan", "inf", "negative"):
        a.X = with_value(a.X, {"nan": np.nan, "inf": np.inf, "negative": -2.0}[case])
    elif case.startswith("empty_cells"):
        X = a.X.tolil()
        X[[2, 5]] = 0
        a.X = X.tocsr()
        args = ["--empty", "zero"] if case == "empty_cells_zero" else []
    elif case == "duplicates":
        names = list(a.var_names)
        names[10], names[20] = names[0], names[1]
        a.var_names = names
    elif case == "mouse_symbols":
        a.var_names = [g[0].upper() + g[1:].lower() for g in a.var_names]
    elif case == "unknown_ids":
        a.var_names = [f"feature_{i}" for i in range(a.n_vars)]
    elif case == "versioned_ensembl":
        table = np.loadtxt(shared_data / "gene_vocabularies/gencode_v44_gene_id2name.csv", dtype=str,
                           delimiter=",")
        ids = dict(zip(table[:, 1], table[:, 0], strict=True))
        keep = [g for g in a.var_names if g in ids]
        a = a[:, keep].copy()
        a.var_names = [f"{ids[g]}.{i % 9 + 1}" for i, g in enumerate(keep)]
    elif case == "dense_float64":
        a.X = a.X.toarray().astype(np.float64)
    elif case in ("counts_in_layer", "counts_in_layer_chosen"):
        a.layers["counts"] = a.X.copy()
        a.X = lognorm(a.X)
        args = ["--layer", "counts"] if case == "counts_in_layer_chosen" else []
    elif case == "counts_in_raw":
        a.raw = a.copy()
        a.X = lognorm(a.X)
    elif case.startswith("ambient"):
        rng = np.random.default_rng(0)
        X = sp.csr_matrix(a.X, dtype=np.float32, copy=True)
        X.data *= rng.uniform(0.55, 0.95, X.nnz).astype(np.float32)  # SoupX-like: counts minus soup
        a.X = X
        args = ["--allow-non-integer"] if case == "ambient_allowed" else []
    elif case == "zero_cells":
        a = a[:0].copy()
    elif case == "non_h5ad":
        path = folder / "in.csv"
        path.write_text("cell,CD3E\nc1,3\n")
        return path, args
    a.write_h5ad(path)
    if case == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path, args


# case -> (exit code, regex the one error line must match; None = success)
CASES = {
    "log1p": (1, r"log-transformed.*--layer counts"),
    "cpm": (1, r"normalised to a fixed total.*--layer counts"),
    "nan": (1, r"NaN or infinite"),
    "inf": (1, r"NaN or infinite"),
    "negative": (1, r"negative values"),
    "empty_cells": (1, r"2 of 40 cells express none.*--empty zero"),
    "empty_cells_zero": (0, None),
    "duplicates": (1, r"occur more than once.*--gene-key COLUMN"),
    "mouse_symbols": (1, r"mouse gene symbols"),
    "unknown_ids": (1, r"none of the .* genes.*--gene-key COLUMN"),
    "versioned_ensembl": (0, None),
    "truncated": (1, r"could not read .*truncated"),
    "non_h5ad": (2, r"not a format cellfm embed reads"),
    "dense_float64": (0, None),
    "counts_in_layer": (1, r"pass --layer counts \(raw counts found in layers\['counts'\]\)"),
    "counts_in_layer_chosen": (0, None),
    "counts_in_raw": (1, r"pass --use-raw \(raw counts found in adata\.raw\)"),
    "ambient": (1, r"not whole numbers.*pass --allow-non-integer"),
    "ambient_allowed": (0, None),
    "zero_cells": (1, r"no cells"),
    "unknown_layer": (1, r"--layer nope is not a layer of the input"),
    "unknown_gene_key": (1, r"--gene-key nope is not a column.*leave out --gene-key"),
    "missing_input": (2, r"does not exist"),
    "missing_model": (1, r"could not load --model"),
    "corrupt_model": (1, r"could not load --model"),
    "random_model_file": (1, r"could not load --model"),
    "missing_output_folder": (2, r"output folder .* does not exist"),
    "existing_output": (2, r"already exists; pass --overwrite"),
    "bad_device": (2, r"--device gpu is not a device.*--device cpu"),
    "bad_empty_choice": (1, r"--empty skip is not a choice.*--empty zero"),
    "interrupted_write": (130, r"interrupted \(Ctrl-C\): .* was not written; .* resumes"),
    "interrupted_embedding": (130, r"interrupted \(Ctrl-C\): .* was not written; .* resumes"),
}


def sha(path: Path) -> str:
    if path.is_dir():
        return "".join(sha(p) for p in sorted(path.iterdir()))
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_matrix(case, cells, model_dir, tmp_path, monkeypatch, request):
    code, pattern = CASES[case]
    shared = request.getfixturevalue("shared_data") if case == "versioned_ensembl" else None
    source, extra = build(case, cells, tmp_path, shared)
    out = tmp_path / "out" / "cells_cellfm.h5ad"
    out.parent.mkdir()
    model = str(model_dir)
    if case == "missing_input":
        source = tmp_path / "nope.h5ad"
    elif case == "missing_model":
        model = str(tmp_path / "no_such_model")
    elif case == "corrupt_model":
        broken = tmp_path / "broken_model"
        broken.mkdir()
        for f in model_dir.iterdir():
            broken.joinpath(f.name).write_bytes(f.read_bytes())
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        model = str(broken)
    elif case == "random_model_file":
        junk = tmp_path / "weights.ckpt"
        junk.write_bytes(np.random.default_rng(0).bytes(4096))
        model = str(junk)
    elif case == "missing_output_folder":
        out = tmp_path / "no_folder" / "out.h5ad"
    elif case == "existing_output":
        out.write_text("keep me")
    elif case == "bad_device":
        extra = ["--device", "gpu"]
    elif case == "unknown_layer":
        extra = ["--layer", "nope"]
    elif case == "unknown_gene_key":
        extra = ["--gene-key", "nope"]
    elif case == "bad_empty_choice":
        extra = ["--empty", "skip"]
    elif case == "interrupted_write":
        def interrupted(path, *args, **kwargs):
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt
        monkeypatch.setattr(cellfm.io.stream_writer, "_append_obsm", interrupted)
    elif case == "interrupted_embedding":
        def stop(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(cellfm.contract.setup, "chunk_batches", stop)
    before, out_before = sha(source), sha(out)

    result = runner.invoke(app, ["embed", str(source), "-o", str(out), "--model", model, "--device",
                                 "cpu", "--batch-size", "16", "--threads", "1", *extra])

    text = result.output
    assert result.exit_code == code, text
    assert "Traceback" not in text and not isinstance(result.exception, Exception | KeyboardInterrupt)
    assert sha(source) == before, "the input file changed"
    assert not list(out.parent.glob(".*partial*")), "a temporary file was left behind"
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("cellfm embed:")]
    errors = [line for line in lines if line.startswith(("error:", "warning:"))]
    if pattern is None:
        assert not errors, text
        written = ad.read_h5ad(out)
        assert written.obsm["X_cellfm"].shape == (N_CELLS, 32) and written.n_vars > 0
        return
    assert len(errors) == 1 and errors[0].startswith("error:"), text
    assert len(lines) == 1 or case == "interrupted_write", text  # the write fails after the report
    assert re.search(pattern, errors[0]), errors[0]
    assert not PYTHON_WORDING.search(text), f"Python wording on the CLI: {text}"
    assert sha(out) == out_before, "the output was written or changed despite the error"
