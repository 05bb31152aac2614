"""GEARS offline: the GO graph builder, GEARS' PertData without network, our forward against
GEARS' own, the CellFM gene-token path, the linear baselines and `cellfm perturb`."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

import cellfm

GENES = ["STAT1", "STAT2", "STAT3", "JAK2", "IFNGR1", "IFNGR2", "CD86", "MYC", "NOT_A_GENE"]


@pytest.fixture(scope="module")
def gene2go(shared_data):
    from cellfm.tasks.go_graph import load_gene2go

    return load_gene2go(shared_data / "go_annotations_org_hs_eg_db")


def test_go_graph_is_gears_jaccard_rule_on_real_annotations(gene2go):
    from cellfm.tasks.go_graph import GO_ROOTS, go_similarity_edges

    assert not any(GO_ROOTS & terms for terms in gene2go.values())
    edges = go_similarity_edges(GENES, gene2go, k=3)
    assert "NOT_A_GENE" not in set(edges.source) | set(edges.target)
    for s, t, w in edges.itertuples(index=False):
        a, b = gene2go[s], gene2go[t]
        assert w == pytest.approx(len(a & b) / len(a | b), abs=1e-6)
        assert w > 0.1
    assert edges.groupby("target").size().max() <= 4  # k + 1
    self_w = edges[edges.source == edges.target].importance
    assert len(self_w) == len(GENES) - 1 and np.allclose(self_w, 1.0)
    # the strongest other neighbour of STAT1 is a fellow STAT, not MYC or CD86
    stat1 = edges[(edges.target == "STAT1") & (edges.source != "STAT1")]
    assert stat1.sort_values("importance").source.iloc[-1] in {"STAT2", "STAT3"}


def test_old_symbols_of_the_screen_find_their_go_terms(gene2go, shared_data):
    """Papalexi names MARCHF8 by its old symbol MARCH8; without the alias GEARS would silently
    treat MARCH8 knock-out cells as unperturbed."""
    import anndata as ad

    from cellfm.tasks.perturbation import read_screen
    from cellfm.tasks.perturbation_benchmark import _known_targets

    assert gene2go["MARCH8"] == gene2go["MARCHF8"]
    assert "TP53" in gene2go and "NOT_A_GENE" not in gene2go
    cells = ad.AnnData(X=np.ones((4, 2), dtype=np.float32),
                       obs={"condition": ["ctrl", "MARCH8+ctrl", "NOT_A_GENE+ctrl", "STAT1+ctrl"]})
    said = []
    kept = _known_targets(read_screen(cells), gene2go, said.append)
    assert list(kept.conditions) == ["ctrl", "MARCH8+ctrl", "STAT1+ctrl"] and kept.values.shape == (3, 2)
    assert "NOT_A_GENE+ctrl" in said[0]


def test_linear_baseline_recovers_a_planted_linear_model():
    from cellfm.tasks.perturbation_baselines import linear_model_predict

    rng = np.random.default_rng(0)
    n_genes, k, d = 50, 4, 6
    G = np.linalg.qr(rng.normal(size=(n_genes, k)))[0]  # orthonormal gene directions
    W, b = rng.normal(size=(k, d)), rng.normal(size=n_genes)
    P = rng.normal(size=(40, d))
    P -= P[:30].mean(0)  # embeddings centred on the training perturbations, as the benchmark passes them
    Y = (G @ W @ P.T).T + b
    pred = linear_model_predict(Y[:30], P[:30], P[30:], k=k, ridge=1e-8)
    assert np.abs(pred - Y[30:]).max() < 1e-5
    # a perturbation embedding with no signal predicts about the training mean
    noise = linear_model_predict(Y[:30], rng.normal(size=(30, d)), P[30:], k=k, ridge=1e3)
    assert np.abs(noise - Y[:30].mean(0)).max() < np.abs(Y[30:] - Y[:30].mean(0)).max() / 10


@pytest.fixture(scope="module")
def pert_data(shared_data, tmp_path_factory, gene2go):
    """GEARS PertData on 25 real cells per condition, built with every socket refused."""
    pytest.importorskip("gears", reason="GEARS not installed: pip install 'cellfm[gears]'")
    from cellfm.evaluation.data import load_benchmark
    from cellfm.tasks.perturbation import read_screen
    from cellfm.tasks.perturbation_gears import gears_input, prepare_pert_data

    screen = read_screen(load_benchmark("papalexi", shared_data), size_factor_key="response_n_umis")
    data = gears_input(screen, max_cells_per_condition=25)
    np.random.seed(0)
    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(OSError("network used")))
    try:
        pdata = prepare_pert_data(data, tmp_path_factory.mktemp("gears"), gene2go)
    finally:
        mp.undo()
    pdata.prepare_split("simulation", seed=1)
    pdata.get_dataloader(8, test_batch_size=16)
    return pdata


def test_adapter_is_gears_forward_with_only_the_gene_embedding_replaced(pert_data):
    """GearsOnCellTokens runs GEARS_Model.forward itself; with the token path's modules swapped
    back to GEARS' own, it computes exactly what GEARS computes."""
    from gears import GEARS
    from gears.model import GEARS_Model

    from cellfm.model.gears_adapter import GearsOnCellTokens
    from cellfm.tasks.perturbation_gears import go_graph_tensors

    assert GearsOnCellTokens.forward is GEARS_Model.forward
    torch.manual_seed(0)
    g = GEARS(pert_data, device="cpu")
    G_go, G_go_weight = go_graph_tensors(pert_data)
    g.model_initialize(hidden_size=16, G_go=G_go, G_go_weight=G_go_weight)
    theirs = g.model.eval()
    n_ctrl, G = len(pert_data.ctrl_adata), len(pert_data.gene_names)
    ours = GearsOnCellTokens(g.config, torch.randn(n_ctrl, G, 8)).eval()
    batch = next(iter(pert_data.dataloader["test_loader"]))
    batch.z = torch.zeros(batch.num_graphs, dtype=torch.long)
    assert any(p != -1 for idx in batch.pert_idx for p in idx)
    with torch.no_grad():
        assert ours(batch).shape == (batch.num_graphs, G)
    own = {k: v for k, v in theirs.state_dict().items() if k in ours.state_dict()}
    ours.load_state_dict(own, strict=False)
    for name in ["gene_emb", "bn_emb", "emb_trans", "emb_pos", "layers_emb_pos", "emb_trans_v2"]:
        setattr(ours, name, getattr(theirs, name))
    with torch.no_grad():  # max_norm embeddings renormalise in place: equal up to float rounding
        torch.testing.assert_close(ours(batch), theirs(batch), rtol=1e-6, atol=1e-6)


def test_adapter_reads_each_cell_s_own_control_tokens(pert_data):
    """Eval mode: a graph's prediction depends on its paired control cell's tokens only."""
    from gears import GEARS

    from cellfm.model.gears_adapter import GearsOnCellTokens
    from cellfm.tasks.perturbation_gears import go_graph_tensors

    torch.manual_seed(0)
    g = GEARS(pert_data, device="cpu")
    G_go, G_go_weight = go_graph_tensors(pert_data)
    g.model_initialize(hidden_size=16, G_go=G_go, G_go_weight=G_go_weight)
    n_ctrl, G = len(pert_data.ctrl_adata), len(pert_data.gene_names)
    tokens = torch.randn(n_ctrl, G, 8)
    model = GearsOnCellTokens(g.config, tokens).eval()
    batch = next(iter(pert_data.dataloader["test_loader"]))
    batch.z = torch.arange(batch.num_graphs) % 3  # graphs paired with control rows 0, 1, 2, 0, ...
    with torch.no_grad():
        before = model(batch)
        tokens[1] += 1.0
        after = model(batch)
    changed = (before - after).abs().amax(1) > 0
    assert changed.tolist() == (batch.z == 1).tolist()
    with pytest.raises(ValueError, match="n_genes"):
        GearsOnCellTokens(g.config, tokens[:, :-1])


def test_cellfm_gene_tokens_pair_with_the_right_control_cell(pert_data):
    from cellfm.tasks.gears_cell_tokens import attach_control_index, control_gene_tokens
    from cellfm.tasks.perturbation_gears import GearsConfig, predicted_profiles, train_gears

    torch.manual_seed(0)
    model = cellfm.CellFM.from_preset("tiny")
    ctrl = pert_data.ctrl_adata
    X = ctrl.X.toarray()
    genes = list(pert_data.adata.var_names)
    tokens = control_gene_tokens(model, X, genes, batch_size=8, progress=False)
    assert tokens.shape == (len(X), len(genes), model.config.d_model)
    with pytest.raises(ValueError, match="one column per gene"):
        control_gene_tokens(model, X[:, :-1], genes, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        control_gene_tokens(model, np.full_like(X[:2], np.nan), genes, progress=False)
    # the tokens of one cell are the encoder's gene outputs for that cell alone
    from cellfm.tasks.perturbation import map_to_vocab

    ids = torch.as_tensor(map_to_vocab(genes, model))[None]
    with torch.no_grad():
        mask = torch.ones_like(ids, dtype=torch.bool)
        states, _ = model.module.eval().encode(ids, torch.as_tensor(X[3:4]), mask)
    torch.testing.assert_close(tokens[3], states[0, 1:], rtol=1e-5, atol=1e-5)
    attach_control_index(pert_data, ctrl)
    for graphs in pert_data.dataset_processed.values():
        for gr in graphs[:5]:
            np.testing.assert_array_equal(gr.x.reshape(-1).numpy(), X[int(gr.z)])
    pert_data.get_dataloader(8, test_batch_size=16)
    g = train_gears(pert_data, GearsConfig(epochs=1, hidden_size=16), tokens=tokens)
    pred, truth = predicted_profiles(g)
    assert set(pred.index) == {c for c in pert_data.set2conditions["test"] if c != "ctrl"}
    assert np.isfinite(pred.to_numpy()).all() and not np.allclose(pred.to_numpy(), truth.to_numpy())


def test_cli_perturb_runs_gears_offline(shared_data, tmp_path):
    pytest.importorskip("gears", reason="GEARS not installed: pip install 'cellfm[gears]'")
    import pandas as pd

    out = tmp_path / "perturb"
    r = _cli("perturb", "-o", str(out), "--model", "preset:tiny", "--data-dir", str(shared_data),
             "--splits", "1", "--epochs", "1", "--max-cells-per-condition", "20", "--threads", "1")
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(out / "perturbation_scores.tsv", sep="\t")
    assert {"GEARS", "GEARS + CellFM gene tokens", "mean of training perturbations",
            "linear, P = GO annotations", "no change (control mean)"} <= set(table.method)
    per = pd.read_csv(out / "perturbation_per_knockout.tsv", sep="\t")
    assert per.groupby("method").size().nunique() == 1  # every method scored on the same knock-outs
    assert per[per.method == "no change (control mean)"].pearson_delta.isna().all()
    assert (out / "perturbation_scores.md").read_text().startswith("| method |")
    assert "GEARS + CellFM gene tokens" in r.stdout
    assert "Epoch" not in r.stdout + r.stderr  # GEARS' own prints are kept off the terminal
    rev = pd.read_csv(out / "reverse_perturbation.tsv", sep="\t")
    assert {"GEARS", "GEARS + CellFM gene tokens", "retrieval (training profiles; pairs additive)",
            "mean of training perturbations"} <= set(rev.method)
    assert (rev.n_candidates == rev.n_candidates.iloc[0]).all() and rev.n_candidates.iloc[0] >= 20
    mean = rev[rev.method == "mean of training perturbations"].iloc[0]
    assert mean.top1 == pytest.approx(mean.chance_top1)  # identical predictions: chance
    assert (rev.top10 >= rev.top3).all() and (rev.top3 >= rev.top1).all()
    assert "Reverse perturbation" in (out / "perturbation_scores.md").read_text()


def test_cli_perturb_refuses_bad_method(tmp_path):
    r = _cli("perturb", "-o", str(tmp_path), "--model", "preset:tiny", "--method", "gnn")
    assert r.returncode == 2 and "--method 'gnn'" in r.stderr and "Traceback" not in r.stderr


def test_cli_perturb_own_screen_names_the_flags(shared_data, tmp_path):
    from cellfm.evaluation.data import load_benchmark

    screen = load_benchmark("papalexi", shared_data)[:200].copy()
    screen.obs = screen.obs.rename(columns={"condition": "guide_target"})
    screen.write_h5ad(tmp_path / "screen.h5ad")
    args = ("perturb", "-o", str(tmp_path / "out"), "--input", str(tmp_path / "screen.h5ad"),
            "--model", "preset:tiny", "--data-dir", str(shared_data), "--method", "embedding")
    r = _cli(*args)
    assert r.returncode == 1 and "--condition-key" in r.stderr and "guide_target" in r.stderr
    r = _cli(*args, "--condition-key", "guide_target", "--control", "non-targeting")
    assert r.returncode == 2 and "--control" in r.stderr and "Traceback" not in r.stderr
    screen.X = np.log1p(screen.X.toarray())  # log data instead of counts
    screen.write_h5ad(tmp_path / "screen.h5ad")
    r = _cli(*args, "--condition-key", "guide_target")
    assert r.returncode == 1 and "log-transformed" in r.stderr and "Traceback" not in r.stderr


def _cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "cellfm.cli", *args], capture_output=True, text=True)
