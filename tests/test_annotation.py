"""Cell type annotation on real pbmc3k cells with a tiny random-init model (CPU).

A random-init encoder carries no biology, so these tests check the machinery (the input contract,
head selection, training and early stopping, calibration, rejection, persistence, scores beside
the baselines, the CLI); the model-vs-baseline numbers are in benchmarks/annotation.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellfm.checkpoints import load_official_annotation
from cellfm.cli.annotate import annotate_app
from cellfm.contract import setup_cells
from cellfm.evaluation.data import BENCHMARKS, load_benchmark
from cellfm.model.annotation_head import AnnotationHead
from cellfm.model.cell_type_head import CellTypeHead
from cellfm.model.cls_heads import ClsLinearHead
from cellfm.tasks.annotation import (
    AnnotatorConfig,
    CellTypeAnnotator,
    annotator_from_official,
    evaluate_annotation,
)
from cellfm.tasks.annotation.calibration import expected_calibration_error, fit_temperature
from cellfm.tasks.annotation.cross_dataset import COARSE, LABEL_TO_CL, coarse_labels, read_ontology
from cellfm.tasks.annotation.evaluate import _shared_genes, cls_logistic_regression
from cellfm.tasks.annotation.heads import StandardisedStates
from cellfm.tasks.annotation.open_set import calibration_target
from cellfm.tasks.annotation.reference import trainable_copy
from cellfm.tasks.annotation.states import TokenStates

LABEL = "classified"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pbmc3k(shared_data):
    return load_benchmark("pbmc3k", shared_data)


def _slice(adata, n, seed=0):
    rng = np.random.default_rng(seed)
    return adata[np.sort(rng.choice(adata.n_obs, n, replace=False))].copy()


def _config(**kw) -> AnnotatorConfig:
    return AnnotatorConfig(**{"progress": False, "device": "cpu", **kw})


@pytest.fixture(scope="module")
def fitted(pbmc3k, tiny):
    ref = _slice(pbmc3k, 400)
    return CellTypeAnnotator(tiny, _config(max_epochs=15)).fit(ref, LABEL), ref


def test_auto_head_trains_both_and_keeps_the_better(fitted):
    ann, _ = fitted
    sel = ann.settings["head_selection"]
    assert set(sel["scores"]) == {"official", "cls_linear"}
    official_wins = sel["scores"]["official"] > sel["scores"]["cls_linear"] + ann.config.selection_margin
    robust = official_wins and sel["bootstrap_wins"] >= 0.95  # wins on 95 % of paired resamples
    assert sel["chosen"] == ("official" if robust else "cls_linear") == ann.settings["head"]
    assert sel["refit_on_all_reference_cells"] == (sel["chosen"] == "cls_linear")
    assert isinstance(ann.head, AnnotationHead) and ann.head.kind == sel["chosen"]
    official = [h for h in ann.history if h["phase"].startswith("official")]
    assert official and all("val_loss_smoothed" in h for h in official)
    assert ann.settings["n_validation"] >= 100  # a usable validation size, not 10 % of 400


def test_predict_writes_key_added_columns_and_roundtrips(fitted, pbmc3k, tmp_path):
    ann, ref = fitted
    query = _slice(pbmc3k, 200, seed=1)
    ann.predict(query, key_added="ct")
    labels = query.obs["ct_label"].astype(str)
    assert set(labels) <= set(ann.classes) | {"unknown"}
    conf = query.obs["ct_confidence"].to_numpy()
    assert ((conf > 0) & (conf <= 1)).all()
    rejected = (conf < ann.threshold) | (query.obs["ct_centroid_distance"].to_numpy() > 1)
    assert ((labels == "unknown").to_numpy() == rejected).all()
    info = query.uns["ct_annotation"]
    assert info["rejected_fraction"] == pytest.approx(rejected.mean())
    closed = query.obs["ct_label_closed_set"].astype(str).to_numpy()
    by = info["rejected_fraction_by_predicted_class"]
    for c, share in zip(by["classes"], by["rejected_fraction"], strict=True):
        assert share == pytest.approx(rejected[closed == c].mean())
    assert info["head"] == ann.settings["head"] and info["input"]["n_matched"] > 0
    assert "cellfm_label" not in query.obs
    query.write_h5ad(tmp_path / "q.h5ad")  # the uns record is h5ad-safe
    again = CellTypeAnnotator.load(ann.save(tmp_path / "ann"))
    assert again.settings["head"] == ann.settings["head"] and again.config == ann.config
    q2 = query.copy()
    again.predict(q2, key_added="ct")
    assert (q2.obs["ct_label"].astype(str) == labels).all()
    np.testing.assert_allclose(q2.obs["ct_confidence"], conf, rtol=1e-5, atol=1e-6)
    q2.obs = q2.obs.iloc[:, :0]
    again.predict(q2, key_added="ct", reject=False)
    assert (q2.obs["ct_label"].astype(str) == q2.obs["ct_label_closed_set"].astype(str)).all()


def test_open_set_calibrated_on_held_out_reference_cells(fitted, pbmc3k):
    ann, ref = fitted
    target = calibration_target(0.05, ann.settings["n_validation"])  # 95 % upper bound of 5 %
    assert 0 <= ann.open_set.reference_rejected <= target < 0.05 and calibration_target(0.05, 500) < 0.037
    assert ann.threshold <= 0.5  # lowered from the requested 0.5 only if needed
    rest = np.setdiff1d(np.arange(pbmc3k.n_obs), np.flatnonzero(pbmc3k.obs_names.isin(ref.obs_names)))
    query = pbmc3k[np.random.default_rng(2).choice(rest, 300, replace=False)].copy()
    ann.predict(query)
    info = query.uns["cellfm_annotation"]
    assert info["rejected_fraction"] == pytest.approx((query.obs["cellfm_label"] == "unknown").mean())
    assert info["rejected_fraction"] <= 0.2, info
    both = (query.obs["cellfm_confidence"] < info["threshold"]) & (query.obs["cellfm_centroid_distance"] > 1)
    n_either = info["rejected_low_confidence"] + info["rejected_far_from_reference"] - both.sum()
    assert info["n_rejected"] == n_either


def test_linear_head_is_logistic_regression_on_the_cls(pbmc3k, tiny):
    ref = _slice(pbmc3k, 300)
    ann = CellTypeAnnotator(tiny, _config(head="cls_linear", val_fraction=0.25)).fit(ref, LABEL)
    assert isinstance(ann.head, ClsLinearHead) and ann.stops[0]["epochs_run"] == 0
    y = ref.obs[LABEL].astype(str).to_numpy()
    query = _slice(pbmc3k, 150, seed=3)
    ann.predict(query, reject=False)
    known = np.isin(y, ann.classes)  # the classes the annotator kept (rare ones are dropped)
    base = cls_logistic_regression(tiny, ref[known], y[known], query)  # the baseline, on the same cells
    agree = (query.obs["cellfm_label_closed_set"].astype(str).to_numpy() == base).mean()
    assert agree > 0.95  # chosen, the linear head is refitted on every reference cell: the baseline


def test_counts_from_a_layer_go_through_the_contract(pbmc3k, tiny):
    ref = _slice(pbmc3k, 200)
    ref.layers["counts"] = ref.X.copy()
    ref.X = sp.csr_matrix(np.log1p(ref.X.toarray()))  # X is log data: refused, the layer is read
    cfg = _config(head="cls_linear")
    with pytest.raises(ValueError, match="layer='counts'"):
        CellTypeAnnotator(tiny, cfg).fit(ref, LABEL)
    ann = CellTypeAnnotator(tiny, cfg).fit(ref, LABEL, layer="counts")
    assert ann.settings["input"]["layer"] == "counts"
    ann.predict(ref, layer="counts")
    with pytest.raises(ValueError):
        ann.predict(ref)  # the same check at predict


def test_token_state_cache_on_disk_equals_encoder(pbmc3k, tiny):
    cells = _slice(pbmc3k, 40)
    checked = setup_cells(cells, tiny, empty="zero")
    mem = TokenStates.compute(checked, tiny, torch.device("cpu"), progress=False)
    disk = TokenStates.compute(checked, tiny, torch.device("cpu"), progress=False, memory_limit=0)
    assert disk.on_disk and not mem.on_disk
    rows = np.array([5, 0, 17])
    (s_mem, m_mem), (s_disk, m_disk) = mem.batch(rows, "cpu"), disk.batch(rows, "cpu")
    assert torch.equal(s_mem, s_disk) and torch.equal(m_mem, m_disk)
    batch = next(iter(setup_cells(cells[rows], tiny).batches(3, sort_by_length=False)))
    with torch.no_grad():
        states, _ = tiny.module.encode(batch.gene_ids, batch.values, batch.token_mask)
    assert torch.equal(m_mem, batch.token_mask)
    torch.testing.assert_close(s_mem[:, 0], states[:, 0])
    torch.testing.assert_close(s_mem[:, 1:][m_mem], states[:, 1:][m_mem], atol=2e-3, rtol=1e-3)


def test_fit_logs_each_epoch_and_says_why_it_stopped(pbmc3k, tiny, caplog):
    ref = _slice(pbmc3k, 300)
    with caplog.at_level("INFO", logger="cellfm.tasks.annotation.training"):
        ann = CellTypeAnnotator(tiny, _config(head="cls_mlp", max_epochs=300, patience=2)).fit(ref, LABEL)
    stop = ann.stops[0]
    assert stop["stopped_early"] and stop["epochs_run"] < 300
    assert stop["epochs_run"] == stop["best_epoch"] + 2  # two epochs without improvement, then stop
    assert f"stopped early at epoch {stop['epochs_run']} of 300" in caplog.text
    assert f"kept epoch {stop['best_epoch']}" in caplog.text
    hist = [h for h in ann.history if h["phase"] == stop["phase"]]
    assert [h["epoch"] for h in hist] == list(range(1, stop["epochs_run"] + 1))
    # the criterion is the moving average (weight 0.5 on the newest epoch) of the validation loss
    ema = hist[0]["val_loss"]
    for h in hist[1:]:
        ema = 0.5 * h["val_loss"] + 0.5 * ema
        assert h["val_loss_smoothed"] == pytest.approx(ema)
    best = min(hist, key=lambda h: h["val_loss_smoothed"])
    assert best["epoch"] == stop["best_epoch"]


def test_annotator_bad_inputs(pbmc3k, tiny, fitted):
    ref = _slice(pbmc3k, 200)
    with pytest.raises(KeyError, match="cell_type"):
        CellTypeAnnotator(tiny, _config()).fit(ref, "cell_type")
    one = ref.copy()
    one.obs["only"] = "T"
    with pytest.raises(ValueError, match="at least 2"):
        CellTypeAnnotator(tiny, _config()).fit(one, "only")
    with pytest.raises(ValueError, match="mode"):
        _config(mode="partial")
    with pytest.raises(ValueError, match="head"):
        _config(head="best")
    rare = ref.copy()
    lab = rare.obs[LABEL].astype(str).to_numpy()
    lab[:3] = "Rare"
    lab[3:6] = "?"  # unlabelled: ignored
    rare.obs["lab"] = lab
    with pytest.warns(UserWarning, match="Rare"):
        ann = CellTypeAnnotator(tiny, _config(head="cls_linear")).fit(rare, "lab")
    assert "Rare" not in ann.classes and "?" not in ann.classes
    alien = ref[:20].copy()
    alien.var_names = [f"NOTAGENE{i}" for i in range(alien.n_vars)]
    with pytest.raises(ValueError):
        fitted[0].predict(alien)
    with pytest.raises(RuntimeError, match="not fitted"):
        CellTypeAnnotator(tiny).predict(ref)


def test_lora_trains_only_adapters_and_merges(pbmc3k, tiny):
    copy = trainable_copy(tiny, "lora", 4)
    trainable = [n for n, p in copy.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = {k: v.clone() for k, v in tiny.module.state_dict().items()}
    ref = _slice(pbmc3k, 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ann = CellTypeAnnotator(tiny, _config(mode="lora", lora_rank=4, max_epochs=1)).fit(ref, LABEL)
    assert ann.settings["head"] == "official"  # auto means official when the encoder trains
    for k, v in tiny.module.state_dict().items():
        assert torch.equal(v, before[k])
    assert ann.encoder.config.lora_rank == 0
    assert not any("lora_" in k for k in ann.encoder.module.state_dict())
    ann.predict(ref[:50].copy())


def test_temperature_scaling_calibrates_overconfident_logits():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2000,), generator=g)
    logits = torch.randn(2000, 4, generator=g)
    logits[torch.arange(2000), labels] += 1.0  # right ~60 % of the time ...
    logits = logits * 8  # ... but nearly always ~100 % sure
    t = fit_temperature(logits, labels)
    assert t > 2
    ece_before = expected_calibration_error(torch.softmax(logits, 1), labels)
    ece_after = expected_calibration_error(torch.softmax(logits / t, 1), labels)
    assert ece_after < ece_before / 3


def test_evaluate_annotation_is_typed_and_scores_three_ways(pbmc3k, tiny):
    r = evaluate_annotation(_slice(pbmc3k, 300), LABEL, tiny, _config(head="cls_linear"))
    methods = list(r.table["method"])
    assert methods[0].startswith("CellFM") and "logreg PCA of log counts" in methods
    row = r.table.iloc[0]
    # over all cells "unknown" counts as wrong, so that score is never above the accepted cells' one
    assert row["accuracy_all"] <= row["accuracy"] + 1e-9
    assert row["unknown_share"] == pytest.approx(r.rejected_fraction)
    assert 0 <= r.score("logreg CellFM CLS") <= 1 and r.n_test == 60


def test_cli_annotate_fit_predict_with_truth(pbmc3k, tmp_path):
    import anndata as ad
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.add_typer(annotate_app, name="annotate")
    _slice(pbmc3k, 250).write_h5ad(tmp_path / "ref.h5ad")
    _slice(pbmc3k, 120, seed=4).write_h5ad(tmp_path / "query.h5ad")
    runner = CliRunner()
    fit = ["annotate", "fit", str(tmp_path / "ref.h5ad"), "--label-key", LABEL, "-o", str(tmp_path / "ann"),
           "--model", "preset:tiny", "--max-epochs", "3", "--threads", "1", "--max-rejected", "0.1"]
    res = runner.invoke(app, fit)
    assert res.exit_code == 0, res.output
    assert "kept (macro-F1 on" in res.output
    predict = ["annotate", "predict", str(tmp_path / "query.h5ad"), "--model", str(tmp_path / "ann"),
               "-o", str(tmp_path / "out.h5ad"), "--truth-key", LABEL,
               "--reference", str(tmp_path / "ref.h5ad")]
    res = runner.invoke(app, predict)
    assert res.exit_code == 0, res.output
    assert "logreg PCA of log counts" in res.output and "logreg CellFM CLS" in res.output
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert "cellfm_label" in out.obs and "cellfm_annotation" in out.uns
    res = runner.invoke(app, [*predict[:7], "--no-reject", "--key-added", "x"])
    assert res.exit_code == 0, res.output
    assert (ad.read_h5ad(tmp_path / "out.h5ad").obs["x_label"] != "unknown").all()
    bad = runner.invoke(app, ["annotate", "fit", str(tmp_path / "ref.h5ad"), "--label-key", "nope", "-o",
                              str(tmp_path / "x"), "--model", "preset:tiny"])
    assert bad.exit_code == 1 and "nope" in bad.output


def test_from_parts_wraps_an_encoder_and_head_trained_elsewhere(pbmc3k, tiny, tmp_path):
    torch.manual_seed(1)
    head = CellTypeHead(32, 4, 3, dropout=0.0)
    names = ["B", "CD4 T", "NK"]  # the order of the head's outputs
    cells = _slice(pbmc3k, 60, seed=5)
    ann = CellTypeAnnotator.from_parts(tiny, head, names, _config())
    probs = ann.predict_proba(cells).to_numpy()
    # the same encoder states and token path as the module itself computes, softmax at T = 1
    batch = next(iter(setup_cells(cells, tiny).batches(60, sort_by_length=False)))
    with torch.no_grad():
        states, _ = tiny.module.encode(batch.gene_ids, batch.values, batch.token_mask)
        want = head(states, batch.token_mask)[0].softmax(-1).numpy()
    np.testing.assert_allclose(probs, want, atol=2e-3)
    ann.predict(cells)
    assert (cells.obs["cellfm_label"] != "unknown").all()  # nothing to calibrate on: no rejection
    ref = _slice(pbmc3k, 200, seed=6)
    ref.obs["types"] = ref.obs[LABEL].astype(str).map({"B": "B", "Memory CD4 T": "CD4 T", "NK": "NK"})
    calibrated = CellTypeAnnotator.from_parts(tiny, head, names, _config(), reference=ref, label_key="types")
    assert calibrated.temperature != 1.0 and calibrated.open_set.reference_rejected <= 0.05
    back = CellTypeAnnotator.load(ann.save(tmp_path / "parts"))
    np.testing.assert_allclose(back.predict_proba(cells).to_numpy(), probs, atol=1e-6)
    with pytest.raises(ValueError, match="3 cell types but 2 names"):
        CellTypeAnnotator.from_parts(tiny, head, names[:2])


def test_official_annotation_checkpoint_becomes_an_annotator(tmp_path, shared_data):
    """The authors' annotation Net (encoder + CellTypeHead) read from a MindSpore checkpoint labels
    real cells as its own modules do: the annotator's probabilities rank the types as the head's
    logits on the same tokens."""
    import anndata as ad
    from official_annotation import write_official_annotation_checkpoint

    path = tmp_path / "net.ckpt"
    write_official_annotation_checkpoint(path)
    _, encoder, head = load_official_annotation(path, n_heads=4)
    classes = [f"type {i}" for i in range(head.n_classes)]
    ann = annotator_from_official(path, classes, AnnotatorConfig(progress=False), n_heads=4)
    cells = ad.read_h5ad(shared_data / "pbmc3k_clustifyr" / "pbmc3k_clustifyr_2000hvg.h5ad")[:24].copy()
    proba = ann.predict_proba(cells)
    batch = next(iter(setup_cells(cells, ann.encoder).batches(24, sort_by_length=False)))
    with torch.no_grad():
        states, _ = encoder.encode(batch.gene_ids, batch.values, batch.token_mask)
        token_logits, _ = head(states, batch.token_mask)  # the official prediction: the token path
    direct = token_logits.argmax(1).numpy()
    assert list(proba.columns) == classes and np.allclose(proba.sum(1), 1, atol=1e-5)
    # the cached token states are float16, so only near-ties may differ
    assert (proba.to_numpy().argmax(1)[batch.cell_index.numpy()] == direct).mean() > 0.9
    ann.predict(cells, reject=False, key_added="official")
    assert set(cells.obs["official_label"]) <= set(classes) and ann.settings["source"] == str(path)
    assert type(ann.head) is CellTypeHead  # the authors' head reads raw states, as it was trained
    with pytest.raises(ValueError, match="names were given"):
        annotator_from_official(path, classes[:-1], n_heads=4)


def test_official_head_trained_here_reads_standardised_states(pbmc3k, tiny, tmp_path):
    """The official head fitted here sits behind a per-feature standardisation of the encoder
    states (statistics of the training cells), outside CellTypeHead; it is saved with the head and
    a per-feature affine change of the states with matching statistics changes nothing."""
    ref = _slice(pbmc3k, 300, seed=3)
    ann = CellTypeAnnotator(tiny, _config(head="official", max_epochs=2)).fit(ref, LABEL)
    head = ann.head
    assert isinstance(head, StandardisedStates) and type(head.inner) is CellTypeHead
    assert head.kind == "official" and head.reads_tokens and ann.settings["standardise_states"]
    cpu = torch.device("cpu")
    cache = TokenStates.compute(setup_cells(ref, tiny, empty="zero"), tiny, cpu, progress=False)
    assert all(np.all(v > 0) for v in cache.feature_stats(np.arange(len(cache)))[1::2])
    states, mask = cache.batch(np.arange(16), cpu)
    assert torch.all(head.standardise(states, mask)[:, 1:][~mask] == 0)  # padding stays zero
    scale, shift = torch.linspace(0.5, 3.0, 32), torch.linspace(-4.0, 4.0, 32)
    moved = StandardisedStates(head.inner, 32).eval()
    moved.set_statistics(*(np.asarray(v) for v in (head.cls_mean * scale + shift, head.cls_std * scale,
                                                  head.tok_mean * scale + shift, head.tok_std * scale)))
    with torch.no_grad():
        want = head.eval()(states, mask)[0]
        real = torch.cat([torch.ones(16, 1), mask.float()], 1)[..., None]  # CLS and real tokens
        got = moved((states * scale + shift) * real, mask)[0]
    torch.testing.assert_close(got, want, atol=5e-3, rtol=1e-2)  # float32 rounding of the affine map
    back = CellTypeAnnotator.load(ann.save(tmp_path / "std"))
    assert isinstance(back.head, StandardisedStates)
    want_p = ann.predict_proba(ref[:40]).to_numpy()
    np.testing.assert_allclose(back.predict_proba(ref[:40]).to_numpy(), want_p, atol=1e-6)
    raw = CellTypeAnnotator(tiny, _config(head="official", max_epochs=1, standardise_states=False))
    assert type(raw.fit(ref, LABEL).head) is CellTypeHead


def test_coarse_types_of_the_three_pbmc_sets_through_the_cell_ontology(shared_data, pbmc3k):
    """Every label of pbmc3k / pbmc4k / pbmc68k has a CL term; the ontology rolls them up to the
    five shared coarse types (platelets and CD34+ cells to none); the PCA baseline of a query with
    another gene panel sees the shared genes only."""
    onto = read_ontology(shared_data)
    for ds in ("pbmc3k", "pbmc4k", "pbmc68k"):
        labels = pd.Series(load_benchmark(ds, shared_data).obs[BENCHMARKS[ds].label_key].astype(str).unique())
        assert labels.isin(list(LABEL_TO_CL)).all(), ds
        coarse = coarse_labels(labels, onto)
        assert set(coarse.dropna()) == set(COARSE.values()), ds
    got = coarse_labels(pd.Series(["Platelet", "CD34+", "DC", "CD4+/CD25 T Reg", "FCGR3A+ Mono"]), onto)
    assert got.isna().tolist()[:2] == [True, True]
    assert got.tolist()[2:] == ["mononuclear phagocyte", "CD4 T cell", "mononuclear phagocyte"]
    ref, query = pbmc3k[:20, :300], pbmc3k[20:30, 100:400]
    a, b = _shared_genes(ref, query, use_raw=False)
    assert list(a.var_names) == list(b.var_names) == list(pbmc3k.var_names[100:300])


def test_query_is_read_through_the_reference_genes(fitted, pbmc3k):
    """A query measuring more genes than the reference (a whole transcriptome against HVGs) is
    read through the reference's genes: its extra genes change nothing."""
    ann, _ = fitted
    query = _slice(pbmc3k, 60, seed=2)
    genes = list(ann.reference_genes)
    half = set(genes[: len(genes) // 2])
    ann.reference_genes = sorted(half)  # as if the reference had measured only these
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the query shares only ..." for the full query
            full = ann.predict_proba(query)
            only = ann.predict_proba(query[:, [g for g in query.var_names if g in half]].copy())
    finally:
        ann.reference_genes = genes
    np.testing.assert_allclose(full.to_numpy(), only.to_numpy(), atol=1e-5)
