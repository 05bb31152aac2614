"""Downstream tasks on small slices of the real data (tiny random-init model, CPU).

A random-init encoder carries no biology, so these tests check the machinery (splits, training,
calibration, open set, persistence, metrics, error messages) and the baselines' real biology; the
model-vs-baseline numbers are in the evaluation report, not asserted here.
"""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pandas as pd
import pytest
import torch

from cellfm.extras import installed_version
from cellfm.tasks import integration_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _slice(adata, key, n, seed=0):
    rng = np.random.default_rng(seed)
    return adata[np.sort(rng.choice(adata.n_obs, n, replace=False))].copy()


@pytest.fixture(scope="module")
def pbmc3k(shared_data):
    from cellfm.evaluation.data import load_benchmark

    return load_benchmark("pbmc3k", shared_data)


@pytest.fixture(scope="module")
def pbmc4k(shared_data):
    from cellfm.evaluation.data import load_benchmark

    return load_benchmark("pbmc4k", shared_data)


# ---- integration --------------------------------------------------------------------------
def _planted_batches(seed=0):
    """Two cell types x two batches; `split` moves batch y far away, `mixed` leaves it in place."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["a", "b"], 200).astype(object)
    batches = np.tile(["x", "y"], 200)
    mixed = rng.normal(size=(400, 5)) + (labels == "b")[:, None] * 6.0
    split = mixed + (batches == "y")[:, None] * 10.0
    labels[:7] = None  # unlabelled cells are left out of the scores
    return {"mixed": mixed, "split": split}, batches, labels


def test_approximate_integration_scores_rank_mixed_above_separated():
    embs, batches, labels = _planted_batches()
    r = integration_metrics.score_embeddings(
        embs, batches, labels, unintegrated="split", scorer="approximate"
    )
    assert r.approximate and r.scorer == "approximate, scib-metrics not installed" and r.n_cells == 393
    t = r.table.set_index("method")
    assert list(t.columns[-3:]) == integration_metrics.AGGREGATES
    assert t.loc["mixed", "kNN batch mixing"] > 0.8 > 0.1 > t.loc["split", "kNN batch mixing"]
    assert t.loc["mixed", "Silhouette batch"] > t.loc["split", "Silhouette batch"]
    assert t.loc["mixed", "KMeans NMI"] > 0.9 and t.loc["mixed", "KMeans ARI"] > 0.9
    assert t.loc["mixed", "Total"] > t.loc["split", "Total"]
    with pytest.raises(KeyError, match="unintegrated"):
        integration_metrics.score_embeddings(embs, batches, labels, unintegrated="pca")


@pytest.mark.slow  # about 2 min on 2 cores, most of it jax compiling the metrics
@pytest.mark.skipif(
    installed_version("scib-metrics") is None, reason="scib-metrics not installed ([eval] extra)"
)
def test_scib_metrics_benchmarker_scores():
    embs, batches, labels = _planted_batches()
    r = integration_metrics.score_embeddings(embs, batches, labels, unintegrated="split", progress=False)
    assert r.scorer.startswith("scib-metrics 0.5") and not r.approximate
    t = r.table.set_index("method")
    for col in ("iLISI", "KBET", "Graph connectivity", "KMeans NMI", "Silhouette label", "cLISI"):
        assert col in t.columns
    assert t.loc["mixed", "iLISI"] > 0.8 > 0.1 > t.loc["split", "iLISI"]
    assert t.loc["split", "PCR comparison"] == pytest.approx(0.0, abs=1e-6)  # itself the reference
    assert t.loc["mixed", "Total"] == pytest.approx(
        0.4 * t.loc["mixed", "Batch correction"] + 0.6 * t.loc["mixed", "Bio conservation"]
    )
    assert t.loc["mixed", "Total"] > t.loc["split", "Total"]


@pytest.mark.skipif(installed_version("scanpy") is None, reason="scanpy not installed ([scanpy] extra)")
def test_hvg_pca_is_scanpys_recipe_and_applies_to_new_cells(pbmc4k):
    import anndata as ad
    import scanpy as sc

    from cellfm.evaluation.baselines import HvgPca

    cells = _slice(pbmc4k, None, 300)
    hp = HvgPca(n_hvg=500, n_pcs=20).fit(cells.X)
    assert hp.backend_.startswith("scanpy")
    ref = ad.AnnData(cells.X.astype(np.float32))
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, n_top_genes=500, flavor="seurat")
    hvg = np.flatnonzero(ref.var["highly_variable"])
    assert (hvg == hp.genes_).all()
    ref = ref[:, hvg].copy()
    sc.pp.scale(ref, max_value=10)
    sc.pp.pca(ref, n_comps=20, random_state=0)
    mine = hp.transform(cells.X)
    assert np.allclose(np.abs(mine), np.abs(ref.obsm["X_pca"]), atol=1e-3 * np.abs(mine).max())
    other = hp.transform(_slice(pbmc4k, None, 50, seed=1).X)  # cells it was not fitted on
    assert other.shape == (50, 20) and np.isfinite(other).all()


def test_integration_on_real_pbmc_batches(shared_data, tiny):
    from cellfm.evaluation.pbmc_batches import build_pbmc_batches, coarse_labels
    from cellfm.tasks.integration import IntegrationConfig, IntegrationResult, evaluate_integration

    adata = build_pbmc_batches(shared_data, max_cells_per_batch=150)
    assert set(adata.obs["batch"]) == {"pbmc4k", "pbmc3k", "celltypist"}
    assert adata.obs.loc[adata.obs["batch"] == "celltypist", "coarse_type"].isna().all()
    assert coarse_labels(pd.Series(["Naive CD4 T", "T_CD4", "MNP"])).tolist() == ["CD4 T", "CD4 T", "Myeloid"]
    before = (list(adata.obsm), list(adata.obs.columns), list(adata.uns), adata.X.copy())
    cfg = IntegrationConfig(harmony=False, scvi_epochs=0, scorer="approximate")
    r = evaluate_integration(adata, tiny, config=cfg, progress=False)
    assert isinstance(r, IntegrationResult)
    t = r.table.set_index("method")
    assert list(t.index) == ["CellFM (zero-shot)", "HVG+PCA"]
    assert t.to_numpy().min() >= -1e-6 and t.to_numpy().max() <= 1 + 1e-6
    assert t.loc["HVG+PCA", "KMeans NMI"] > 0.3  # real cell types separate in PCA
    assert r.n_scored == (adata.obs["coarse_type"].notna()).sum() < adata.n_obs
    assert r.embeddings["HVG+PCA"].shape == (adata.n_obs, 50)
    assert r.embeddings["CellFM (zero-shot)"].shape == (adata.n_obs, tiny.config.d_model)
    # the caller's AnnData is only read
    assert (list(adata.obsm), list(adata.obs.columns), list(adata.uns)) == before[:3]
    assert (adata.X != before[3]).nnz == 0
    text = r.describe()
    assert "approximate, scib-metrics not installed" in text and "HVG+PCA: " in text
    with pytest.raises(KeyError, match="no column 'donor'"):
        evaluate_integration(adata, tiny, batch_key="donor")
    with pytest.raises(ValueError, match="scvi_epochs=-1"):
        IntegrationConfig(scvi_epochs=-1)


@pytest.mark.slow  # about 30 s: importing scvi-tools / lightning dominates
@pytest.mark.skipif(
    installed_version("harmonypy") is None or installed_version("scvi-tools") is None,
    reason="harmonypy / scvi-tools not installed ([eval] extra)",
)
def test_harmony_and_scvi_baselines_mix_real_batches(shared_data):
    from cellfm.evaluation.integration_baselines import integration_baselines
    from cellfm.evaluation.pbmc_batches import build_pbmc_batches

    adata = build_pbmc_batches(shared_data, datasets=("pbmc4k", "pbmc3k"), max_cells_per_batch=200)
    run = integration_baselines(adata, "batch", scvi_epochs=3, progress=False)
    assert set(run.embeddings) == {"HVG+PCA", "Harmony", "scVI"}, run.notes
    assert run.embeddings["scVI"].shape == (adata.n_obs, 10) and "3 epochs" in run.notes["scVI"]
    r = integration_metrics.score_embeddings(
        run.embeddings, adata.obs["batch"].to_numpy(), adata.obs["coarse_type"].to_numpy(),
        unintegrated="HVG+PCA", scorer="approximate",
    )
    mixing = r.table.set_index("method")["kNN batch mixing"]
    assert mixing["Harmony"] > mixing["HVG+PCA"]  # the two data sets separate in plain PCA


# ---- perturbation -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def papalexi(shared_data):
    from cellfm.evaluation.data import load_benchmark

    return load_benchmark("papalexi", shared_data)


def test_perturbation_effects_show_ifng_pathway(papalexi):
    from cellfm.tasks.perturbation import perturbation_effects

    eff = perturbation_effects(papalexi)
    assert eff.shape == (25, 299)
    # IFN-gamma receptor / JAK-STAT knock-outs lower IFN-gamma targets in IFN-gamma-stimulated THP-1
    for ko in ("IFNGR1", "JAK2", "STAT1"):
        assert eff.loc[ko, "PSMB9"] < -0.3
    bad = papalexi[:100].copy()
    with pytest.raises(KeyError, match="perturbation"):
        perturbation_effects(bad, condition_key="perturbation")
    bad.obs["condition"] = "X+ctrl"
    with pytest.raises(ValueError, match="control"):
        perturbation_effects(bad)


def test_perturbation_evaluation_holds_out_knockouts(papalexi, pbmc4k, tiny):
    from cellfm.tasks.perturbation import evaluate_perturbation

    r = evaluate_perturbation(papalexi, tiny, reference=pbmc4k[:300].copy())
    t = r["table"].set_index("method")
    assert len(t) == 5 and r["per_perturbation"]["perturbation"].nunique() == 25
    # knock-outs in this screen share a pathway, so the mean of other knock-outs already correlates
    assert t.loc["mean of training effects", "pearson_top_de"] > 0.1


# ---- gene function and networks ---------------------------------------------------------------
def test_gene_function_binary_task(shared_data, pbmc4k, tiny):
    from cellfm.tasks.gene_function import PAPER_BINARY_TASKS, evaluate_binary_tasks, vocab_symbols_of

    assert vocab_symbols_of(["ENSG00000141510", "TP53", "NOTAGENE"], tiny).tolist() == ["TP53", "TP53", ""]
    t = evaluate_binary_tasks(tiny, data_dir=shared_data, reference=pbmc4k, tasks=["bivalent_vs_lys4_only"],
                              progress=False)
    assert set(t["method"]) == {"CellFM", "expression stats", "random"}
    assert t["auroc"].between(0, 1).all() and t["accuracy"].between(0, 1).all() and (t["n_genes"] > 150).all()
    # bivalent (developmental, silent in blood) vs H3K4me3-only (active) genes: expression tells them apart
    expr = t.set_index("method").loc["expression stats"]
    assert expr["auroc"] > 0.75 and expr["accuracy"] > 0.65
    with pytest.raises(KeyError, match="unknown gene tasks"):
        evaluate_binary_tasks(tiny, data_dir=shared_data, tasks=["no_such_task"])
    with pytest.raises(KeyError, match="unknown gene tasks"):  # the paper's three are in the label file
        evaluate_binary_tasks(tiny, data_dir=shared_data, tasks=[*PAPER_BINARY_TASKS, "x"])


def test_multilabel_metrics_are_the_tutorials():
    from cellfm.tasks.gene_function import multilabel_metrics

    rng = np.random.default_rng(0)
    Y = (rng.random((400, 10)) < 0.2).astype(int)
    perfect = multilabel_metrics(Y, Y * 0.9 + 0.05)
    assert perfect["aupr"] == pytest.approx(1.0) and perfect["fmax"] == pytest.approx(1.0)
    assert perfect["auroc"] == pytest.approx(1.0)
    chance = multilabel_metrics(Y, rng.random(Y.shape))
    assert abs(chance["aupr"] - chance["label_density"]) < 0.05 and abs(chance["auroc"] - 0.5) < 0.05


def test_go_top10_terms_multilabel(shared_data, tiny):
    from cellfm.evaluation.gene_labels import load_go_annotations
    from cellfm.tasks.gene_function import evaluate_go_terms, go_top_terms

    go = load_go_annotations(shared_data, "MF", propagated=False)
    top = go_top_terms(go, set(tiny.vocab.genes), 3)
    assert top[0] == "GO:0005515" and "GO:0003674" not in top  # protein binding; the root is excluded
    r = evaluate_go_terms(tiny, data_dir=shared_data, ontologies=("MF",), n_terms=3, max_genes=400,
                          n_folds=3, progress=False)
    s = r.summary.set_index("method")
    assert set(s.index) == {"CellFM", "random"} and (s["n_terms"] == 3).all() and (s["n_genes"] == 400).all()
    assert s[["aupr", "fmax", "auroc"]].stack().between(0, 1).all()
    assert set(r.terms["go_id"]) == set(top) and (r.terms["n_positive"] > 0).all()
    # every gene carries at least one of the terms, and protein binding most of them
    assert s["label_density"].iloc[0] >= 1 / 3


def test_neighbour_enrichment_detects_planted_modules():
    from cellfm.tasks.gene_network import coannotation_enrichment, cosine_neighbours, gene_neighbours

    rng = np.random.default_rng(0)
    genes = np.array([f"G{i}" for i in range(300)])
    module = np.repeat(np.arange(30), 10)  # 30 modules of 10 genes
    sets = {f"T{m}": set(genes[module == m]) for m in range(30)}
    planted = rng.normal(size=(30, 16))[module] + 0.3 * rng.normal(size=(300, 16))
    idx, sim = cosine_neighbours(planted, 5)
    assert (idx != np.arange(300)[:, None]).all() and (np.diff(sim, axis=1) <= 1e-6).all()
    res = coannotation_enrichment(idx, genes, sets, n_permutations=20)
    assert res.fold_enrichment > 5 and res.p_permutation < 0.1
    noise, _ = cosine_neighbours(rng.normal(size=(300, 16)), 5)
    assert coannotation_enrichment(noise, genes, sets, n_permutations=5).fold_enrichment < 2
    table = gene_neighbours(pd.DataFrame(planted, index=genes), k=3)
    assert len(table) == 900 and table.iloc[0]["rank"] == 1


# ---- report and CLI ------------------------------------------------------------------------
def test_report_writes_markdown(shared_data, tiny, tmp_path, monkeypatch):
    from cellfm.evaluation.report import run_evaluation
    from cellfm.evaluation.results import EvaluationConfig, EvaluationReport

    cfg = EvaluationConfig(tasks=("perturbation",), quick=True, progress=False)
    report = run_evaluation(tiny, tmp_path, data_dir=shared_data, config=cfg)
    assert isinstance(report, EvaluationReport) and not report.failed
    assert list(report.sections) == ["Perturbation effect prediction"] and len(report.summary) == 1
    text = report.path.read_text()
    assert "Failed" not in text and "## Summary" in text
    if importlib.util.find_spec("gears") is not None:  # GEARS beside its baselines
        assert "| GEARS + CellFM gene tokens |" in text and "| mean of training perturbations |" in text
        assert "| perturbation (unseen knock-outs) | Pearson of Δ, top-20 DE genes |" in text
    else:
        assert "GEARS did not run" in text and "| mean of training effects |" in text
        assert "| perturbation | Pearson, top-20 DE genes |" in text
    assert report.results_path.is_file()
    with pytest.raises(ValueError, match="unknown tasks"):
        EvaluationConfig(tasks=("dance",))
    monkeypatch.delenv("CELLFM_DATA_DIR", raising=False)  # no folder given: the error says how to give one
    with pytest.raises(ValueError, match="data_dir=<folder> or set CELLFM_DATA_DIR"):
        run_evaluation(tiny, tmp_path, config=cfg)


@pytest.mark.skipif(
    installed_version("scib-metrics") is not None,
    reason="checks the path without the [eval] extra; with it the scores take minutes (slow tests)",
)
def test_cli_integrate_and_gene_function_without_extras(shared_data, tmp_path):
    import typer
    from typer.testing import CliRunner

    from cellfm.cli.analysis import gene_function, integrate

    app = typer.Typer()
    app.command("integrate")(integrate)
    app.command("gene-function")(gene_function)
    runner = CliRunner()
    out = tmp_path / "integration"
    res = runner.invoke(app, ["integrate", "-o", str(out), "--model", "preset:tiny", "--data-dir",
                              str(shared_data), "--max-cells-per-batch", "80", "--scvi-epochs", "0",
                              "--no-harmony", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "approximate, scib-metrics not installed" in res.output and "HVG+PCA: " in res.output
    scores = pd.read_csv(out / "integration_scores.tsv", sep="\t")
    assert scores["method"].tolist() == ["CellFM (zero-shot)", "HVG+PCA"] and "Total" in scores
    assert "scores: approximate" in (out / "integration_methods.txt").read_text()
    bad = runner.invoke(app, ["integrate", "-o", str(out), "--model", "preset:tiny", "--scvi-epochs", "-1"])
    assert bad.exit_code == 2 and "--scvi-epochs" in bad.output
    res = runner.invoke(app, ["gene-function", "-o", str(tmp_path / "gf"), "--model", "preset:tiny",
                              "--data-dir", str(shared_data), "--no-go", "--threads", "1"])
    assert res.exit_code == 0, res.output
    binary = pd.read_csv(tmp_path / "gf" / "gene_function_binary.tsv", sep="\t")
    assert set(binary["task"]) == {"dosage_sensitive_vs_insensitive_tf", "bivalent_vs_no_methyl",
                                   "bivalent_vs_lys4_only"}
    assert {"accuracy", "auroc"} <= set(binary.columns)


def test_cli_integrate_on_a_users_file(pbmc3k, tmp_path):
    """`--input FILE --batch-key K --label-key L` goes through the input contract: the user's own
    file is scored, and a file of log-normalised values ends with one error line, exit 1."""
    from typer.testing import CliRunner

    from cellfm.cli import _register, app
    from cellfm.tokenizer import lognorm

    _register()
    cells = _slice(pbmc3k, "classified", 120)
    cells.obs["donor"] = np.where(np.arange(cells.n_obs) % 2, "a", "b")
    cells.write_h5ad(tmp_path / "mine.h5ad")
    base = ["integrate", "-o", str(tmp_path / "out"), "--model", "preset:tiny", "--scvi-epochs", "0",
            "--no-harmony", "--threads", "1", "--device", "cpu"]
    runner = CliRunner()
    res = runner.invoke(app, [*base, "--input", str(tmp_path / "mine.h5ad"), "--batch-key", "donor",
                              "--label-key", "classified"])
    assert res.exit_code == 0, res.output
    scores = pd.read_csv(tmp_path / "out" / "integration_scores.tsv", sep="\t")
    assert scores["method"].tolist() == ["CellFM (zero-shot)", "HVG+PCA"]
    assert f"on {cells.n_obs} labelled cells" in res.output
    logged = cells.copy()
    logged.X = lognorm(logged.X)
    logged.write_h5ad(tmp_path / "log.h5ad")
    nan = cells.copy()
    nan.X = nan.X.astype(np.float32)
    nan.X[0, nan.X[0].indices[0]] = np.nan
    nan.write_h5ad(tmp_path / "nan.h5ad")
    dup = cells.copy()
    dup.var_names = [dup.var_names[0], *dup.var_names[:-1]]
    dup.write_h5ad(tmp_path / "dup.h5ad")
    before = {f: (tmp_path / f).read_bytes() for f in ("mine.h5ad", "log.h5ad", "nan.h5ad", "dup.h5ad")}
    keys = ["--batch-key", "donor", "--label-key", "classified"]
    for extra, code, message in [
        (["--input", str(tmp_path / "log.h5ad"), *keys], 1, "--allow-non-integer|log"),
        (["--input", str(tmp_path / "nan.h5ad"), *keys], 1, "NaN or infinite"),
        (["--input", str(tmp_path / "dup.h5ad"), *keys], 1, "more than once.*--gene-key COLUMN"),
        (["--input", str(tmp_path / "mine.h5ad"), *keys, "--layer", "nope"], 1, "--layer nope is not"),
        (["--input", str(tmp_path / "mine.h5ad"), *keys, "--device", "gpu"], 2, "--device gpu"),
        (["--input", str(tmp_path / "mine.h5ad")], 2, "--batch-key COLUMN"),
        (["--input", str(tmp_path / "none.h5ad"), "--batch-key", "donor", "--label-key", "classified"], 2,
         "does not exist"),
        (["--input", str(tmp_path / "mine.h5ad"), "--batch-key", "plate", "--label-key", "classified"], 1,
         "no column 'plate'"),
    ]:
        res = runner.invoke(app, [*base, *extra])
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert res.exit_code == code and len(errors) == 1, res.output
        assert re.search(message, errors[0]) and "Traceback" not in res.output, res.output
    assert before == {f: (tmp_path / f).read_bytes() for f in before}  # inputs only read


def test_integration_fine_tune_changes_a_copy(pbmc3k, tiny):
    from cellfm.tasks.integration_finetune import ecs_loss, fine_tune_for_integration

    at_threshold = torch.tensor([[1.0, 0.0], [0.8, 0.6]])  # cosine 0.8
    identical = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # cosine 1: pushed away from 0.8, lower loss
    torch.testing.assert_close(ecs_loss(at_threshold), torch.tensor((2 * 1.0 + 2 * (1 - 0.64)) / 4))
    assert ecs_loss(identical) < ecs_loss(at_threshold)
    before = {k: v.clone() for k, v in tiny.module.state_dict().items()}
    tuned = fine_tune_for_integration(_slice(pbmc3k, "classified", 64), tiny, epochs=1, progress=False)
    for k, v in tiny.module.state_dict().items():
        assert torch.equal(v, before[k])
    changed = [k for k, v in tuned.module.state_dict().items() if not torch.equal(v, before[k])]
    assert "gene_emb" in changed and any(k.startswith("encoder") for k in changed)
