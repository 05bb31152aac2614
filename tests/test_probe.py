"""Cell-identity probe and the objective's identity knobs: the probe scores label-carrying
embeddings high and label-free ones at chance, `cellfm pretrain` logs it at step 0 and at every
evaluation, and the cell-wise weight / offset change the objective as documented."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cellfm.batch import CellBatch
from cellfm.config import get_preset
from cellfm.model import CellFMModule, pretraining_loss
from cellfm.training import TrainConfig, pretrain
from cellfm.training.probe import cls_embeddings, load_probe_set, probe_accuracy


@pytest.fixture(scope="module")
def pbmc68k(shared_data):
    return shared_data / "pbmc68k_reduced_scanpy" / "pbmc68k_reduced_counts.h5ad"


def test_probe_set_tokenizes_labelled_cells(pbmc68k):
    import anndata as ad

    probe = load_probe_set(pbmc68k, "bulk_labels", get_preset("tiny"), max_cells=300)
    labels = ad.read_h5ad(pbmc68k).obs["bulk_labels"].astype(str)
    n = len(probe.labels)
    assert 250 < n <= 300 and set(probe.classes) <= set(labels)
    assert np.bincount(probe.labels).min() >= 10  # classes too small to cross-validate are left out
    assert (probe.labels >= 0).all()  # every cell has matched genes
    seen = np.concatenate([b.cell_index.numpy() for b in probe.batches])
    assert sorted(seen) == list(range(n))
    with pytest.raises(KeyError, match="probe_label_key"):
        load_probe_set(pbmc68k, "no_such_column", get_preset("tiny"))


def test_probe_accuracy_separates_signal_from_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    informative = np.eye(4)[y] * 3 + rng.normal(size=(400, 4))
    noise = rng.normal(size=(400, 16))
    good, bad = probe_accuracy(informative, y), probe_accuracy(noise, y)
    assert good["knn_acc"] > 0.9 and good["linear_acc"] > 0.9
    assert bad["knn_acc"] < 0.4 and bad["linear_acc"] < 0.4  # chance is ~0.25


def test_pretrain_logs_probe_at_step0_and_each_eval(shared_data, pbmc68k, tmp_path):
    from cellfm.corpus import build_corpus

    corpus = tmp_path / "corpus"
    build_corpus([pbmc68k], corpus, workers=1, progress=False)
    cfg = TrainConfig(corpus_dir=str(corpus), out_dir=str(tmp_path / "run"), preset="tiny", batch_size=16,
                      max_steps=8, warmup_steps=2, lr=1e-3, eval_every=4, eval_batches=1, ckpt_every=8,
                      log_every=4, threads=1, progress=False, probe_files=[str(pbmc68k)],
                      probe_label_key="bulk_labels", probe_max_cells=200)
    model_dir = pretrain(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    probes = [r for r in log if "probe/mean_knn_acc" in r]
    assert [r["step"] for r in probes] == [0, 4, 8]
    for r in probes:
        assert 0 < r["probe/pbmc68k_reduced_counts/linear_acc"] <= 1
    # the logged final score is the exported model's score
    import cellfm

    probe = load_probe_set(pbmc68k, "bulk_labels", get_preset("tiny"), max_cells=200)
    final = probe_accuracy(cls_embeddings(cellfm.load(model_dir).module, probe), probe.labels)
    assert final["knn_acc"] == pytest.approx(probes[-1]["probe/pbmc68k_reduced_counts/knn_acc"])


def test_probe_config_errors(tmp_path):
    with pytest.raises(ValueError, match="one per file"):
        TrainConfig(corpus_dir="c", out_dir="o", probe_files=["a.h5ad", "b.h5ad"], probe_label_key=["x"])
    with pytest.raises(ValueError, match="cellwise_weight"):
        TrainConfig(corpus_dir="c", out_dir="o", cellwise_weight=-1.0)


def _batch() -> CellBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1000, (3, 12), generator=g)
    vals = torch.rand(3, 12, generator=g) * 3
    tok = torch.ones(3, 12, dtype=torch.bool)
    tok[2, 8:] = False
    hidden = torch.zeros(3, 12, dtype=torch.bool)
    hidden[:, :3] = True
    return CellBatch(ids, vals * tok, tok, hidden_mask=hidden, loss_mask=hidden.clone())


def test_cellwise_weight_scales_only_the_cell_terms():
    torch.manual_seed(0)
    module = CellFMModule(get_preset("tiny")).eval()
    b = _batch()
    out = module(b.gene_ids, b.values, b.token_mask, b.hidden_mask)
    one, five = pretraining_loss(out, b), pretraining_loss(out, b, cellwise_weight=5.0)
    assert torch.allclose(five["loss"], one["gene_mse"] + 5 * one["cell_mse"])


def test_cellwise_offset_adds_the_visible_mean():
    torch.manual_seed(0)
    plain = CellFMModule(get_preset("tiny")).eval()
    offset = CellFMModule(get_preset("tiny").replace(cellwise_offset=True)).eval()
    offset.load_state_dict(plain.state_dict())
    b = _batch()
    a = plain(b.gene_ids, b.values, b.token_mask, b.hidden_mask)
    c = offset(b.gene_ids, b.values, b.token_mask, b.hidden_mask)
    seen = b.token_mask & ~b.hidden_mask
    mean = torch.stack([b.values[i][seen[i]].mean() for i in range(3)])  # hidden values never leak in
    assert torch.allclose(c.cell_pred - a.cell_pred, mean[:, None].expand(3, 12), atol=1e-6)
    assert torch.equal(c.cell_emb, a.cell_emb) and torch.equal(c.gene_pred, a.gene_pred)


def test_cell_identity_task_scores_cellfm_beside_pca_and_random_init(shared_data):
    """The identity table of the report / benchmark: one row per embedding, PCA of real counts
    separates the sorted pbmc68k populations better than an untrained tiny model."""
    import cellfm
    from cellfm.evaluation.cell_identity import evaluate_cell_identity, identity_targets

    torch.manual_seed(1)
    model = cellfm.CellFM(get_preset("tiny"))
    table = evaluate_cell_identity(model, shared_data, seeds=(0,), max_cells=300, sets=("pbmc68k",))
    acc = table.set_index("embedding")["knn_acc"]
    assert list(acc.index) == ["CellFM CLS", "random init CLS", "PCA of HVG log counts"]
    assert acc["PCA of HVG log counts"] > acc["random init CLS"] + 0.1
    assert ((table["linear_acc"] > 0) & (table["linear_acc"] <= 1)).all()
    (line,) = identity_targets(table)
    assert line.startswith("pbmc68k: kNN") and ("met" in line or "missed" in line)
