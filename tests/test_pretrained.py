"""The built-in `cellfm-mini` model: ships with the package, loads offline, and beats the
per-gene-mean baseline at recovering masked values of real cells it was never trained on."""

from __future__ import annotations

import json

import numpy as np

import cellfm
from cellfm.cellfm import PRETRAINED_DIR

MINI = PRETRAINED_DIR / "cellfm-mini"


def test_builtin_model_loads_offline_and_is_small():
    model = cellfm.load("cellfm-mini")
    size = sum(f.stat().st_size for f in MINI.iterdir())
    assert size <= 20 * 2**20, f"cellfm-mini is {size / 2**20:.1f} MiB, the package budget is 20"
    small = cellfm.config.get_preset("small")
    for field in ("d_model", "n_layers", "n_heads", "value_bins", "n_genes", "pad_zero"):
        assert getattr(model.config, field) == getattr(small, field), field
    assert model.vocab.name == model.config.vocabulary == "cellfm-27k"
    assert model.vocab.sha256 == cellfm.vocab.load_vocabulary("cellfm-27k").sha256
    card = (MINI / "MODEL_CARD.md").read_text()
    scores = json.loads((MINI / "scores.json").read_text())
    assert f"{scores['val_gene_mse']:.4f}" in card and f"{scores['baseline_mse']:.4f}" in card
    assert scores["val_gene_mse"] < scores["baseline_mse"]


def test_builtin_model_beats_per_gene_mean_on_held_out_cells(shared_data, tmp_path):
    """Rebuild the pbmc4k part of the training corpus: its held-out split (a hash of file name and
    cell id) is the same cells the model never saw; score both predictors on their masked values."""
    from cellfm.corpus import build_corpus
    from cellfm.training.evaluate import held_out_dataset, masked_value_mse, per_gene_mean_mse, per_gene_means

    corpus = tmp_path / "corpus"
    build_corpus([shared_data / "pbmc4k_soupx" / "pbmc4k_soupx_half.h5ad"], corpus, workers=1, progress=False)
    model = cellfm.load("cellfm-mini")
    val = held_out_dataset(corpus, batch_size=32, val_fraction=0.1, max_genes=model.config.max_genes, seed=0)
    assert 150 < val.n_cells < 260  # ~10 % of the 2,029 kept cells
    means = per_gene_means(corpus, val_fraction=0.1, n_rows=model.config.gene_table_rows,
                           max_genes=model.config.max_genes)
    baseline = per_gene_mean_mse(means, val)["baseline_mse"]
    ours = masked_value_mse(model.module, val)
    assert np.isfinite(ours["val_gene_mse"])
    assert ours["val_gene_mse"] < 0.9 * baseline, (ours, baseline)
