"""GEARS, run offline, beside GEARS + CellFM gene tokens and the simple baselines.

One split (GEARS' "simulation" split: a seeded 75 % of the perturbed genes train, the rest are
unseen at test; GEARS holds out part of the training perturbations for validation) is used by
every method. Scores per held-out perturbation, from the mean predicted and the mean true profile
of its cells, then averaged over perturbations:

- Pearson of Δ = profile - control mean, over all genes and over the 20 DE genes GEARS ranks
  (scanpy rank_genes_groups against control);
- MSE of the profile over those 20 DE genes (GEARS' `mse_de`).

Data: the screen as `perturbation.read_screen` checked and log-normalised it (with the cell's
full-transcriptome UMI total when the caller names that column, else its panel total); the same
matrix is GEARS' input and the CellFM encoder's values.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from cellfm.tasks.go_graph import go_similarity_edges, write_gears_go_file
from cellfm.tasks.perturbation import Screen, pearson


@dataclass(frozen=True)
class GearsConfig:
    """GEARS' own defaults except where CPU time needs less (`max_cells_per_condition`)."""

    epochs: int = 10  # GEARS' default is 20, but it halves the lr every epoch: past 10 it is < 1e-6
    batch_size: int = 32
    hidden_size: int = 64  # GEARS' default; the CellFM authors used 512 with their 1536-wide model
    lr: float = 1e-3
    train_gene_set_size: float = 0.75
    max_cells_per_condition: int | None = 200  # None: every cell (GEARS trains on all)
    device: str = "cpu"


def require_gears() -> None:
    try:
        import gears  # noqa: F401
        import torch_geometric  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"GEARS is not installed ({err.name} missing): pip install \"cellfm[gears]\" "
            "(cell-gears and torch_geometric; no extra torch is pulled)"
        ) from err


def gears_input(screen: Screen, max_cells_per_condition: int | None = None, seed: int = 0) -> ad.AnnData:
    """A new AnnData in GEARS' layout: log-normalised CSR X, var['gene_name'], obs['condition']
    ('ctrl' for the control cells), obs['cell_type']; conditions down-sampled to
    `max_cells_per_condition` cells (seeded)."""
    cond, control = screen.conditions, screen.control
    rng = np.random.default_rng(seed)
    keep = []
    for c in pd.unique(cond):
        rows = np.flatnonzero(cond == c)
        if max_cells_per_condition is not None and len(rows) > max_cells_per_condition:
            rows = np.sort(rng.choice(rows, max_cells_per_condition, replace=False))
        keep.append(rows)
    keep = np.sort(np.concatenate(keep))
    genes = screen.genes
    return ad.AnnData(
        X=sp.csr_matrix(screen.values[keep], dtype=np.float32),
        obs=pd.DataFrame({"condition": np.where(cond[keep] == control, "ctrl", cond[keep]),
                          "cell_type": "cells"}, index=screen.obs_names[keep]),
        var=pd.DataFrame({"gene_name": genes}, index=genes),
    )


def prepare_pert_data(adata_gears: ad.AnnData, workdir: str | Path, gene2go: dict[str, set[str]],
                      quiet: bool = True):
    """GEARS `PertData` built offline: `gene2go` (go_graph.load_gene2go) in place of its download,
    the small perturbation graph (panel genes + perturbed genes), DE genes computed by GEARS."""
    require_gears()
    from gears import PertData

    workdir = Path(workdir)
    write_gears_go_file(workdir, gene2go)
    with _quiet(quiet):
        pd_ = PertData(str(workdir), default_pert_graph=False)
        pd_.new_data_process(dataset_name="perturb", adata=adata_gears.copy())
    pd_.adata.X = _SeriesIndexableCSR(pd_.adata.X)
    return pd_


class _SeriesIndexableCSR(sp.csr_matrix):
    """cell-gears 0.1.2 indexes X with a pandas boolean Series (`GEARS.__init__`), which scipy
    >= 1.11 refuses; converting the Series to a numpy mask keeps the same meaning."""

    def __getitem__(self, key):
        if isinstance(key, pd.Series):
            key = key.to_numpy()
        return super().__getitem__(key)


def go_graph_tensors(pert_data, k: int = 20):
    """GEARS' GO graph over its perturbation genes, as `model_initialize` wants it."""
    from gears.utils import GeneSimNetwork

    genes = list(pert_data.pert_names)
    edges = go_similarity_edges(genes, pert_data.gene2go, k=k)
    net = GeneSimNetwork(edges, genes, node_map=pert_data.node_map_pert)
    return net.edge_index, net.edge_weight


def train_gears(pert_data, cfg: GearsConfig, tokens: torch.Tensor | None = None, seed: int = 0,
                quiet: bool = True):
    """Train GEARS (tokens None) or GEARS + CellFM tokens on the prepared split; returns the
    trained `GEARS` wrapper (its `best_model` is the one GEARS selects on validation DE MSE)."""
    from gears import GEARS

    # the adapter subclasses GEARS' model, so it is the optional extra too (importing gears costs
    # seconds of numba compilation, which no other command should pay)
    from cellfm.model.gears_adapter import GearsOnCellTokens

    torch.manual_seed(seed)
    np.random.seed(seed)
    G_go, G_w = go_graph_tensors(pert_data)
    with _quiet(quiet):
        g = GEARS(pert_data, device=cfg.device)
        g.model_initialize(hidden_size=cfg.hidden_size, G_go=G_go, G_go_weight=G_w)
        if tokens is not None:
            g.model = GearsOnCellTokens(g.config, tokens).to(cfg.device)
        g.train(epochs=cfg.epochs, lr=cfg.lr)
    return g


def predicted_profiles(g, loader_name: str = "test_loader") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean predicted and mean true profile per perturbation over the loader's cells."""
    from gears.inference import evaluate

    res = evaluate(g.dataloader[loader_name], g.best_model, False, g.device)
    cats = pd.Series(res["pert_cat"])
    genes = list(g.gene_list)
    pred = pd.DataFrame(res["pred"], columns=genes).groupby(cats.values).mean()
    truth = pd.DataFrame(res["truth"], columns=genes).groupby(cats.values).mean()
    return pred, truth


def de_genes(adata_gears: ad.AnnData, conditions: list[str], n: int = 20) -> dict[str, np.ndarray]:
    """Column indices of each condition's top-n DE genes, as GEARS ranks them."""
    ranked = adata_gears.uns["rank_genes_groups_cov_all"]
    name = dict(zip(adata_gears.obs.condition.astype(str), adata_gears.obs.condition_name.astype(str),
                    strict=False))
    col = {g: i for i, g in enumerate(adata_gears.var_names)}
    return {c: np.array([col[g] for g in ranked[name[c]][:n]]) for c in conditions}


def score_profiles(pred: pd.DataFrame, truth: pd.DataFrame, ctrl: np.ndarray,
                   de: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per perturbation: pearson_delta, pearson_delta_de, mse_de."""
    rows = []
    for c in truth.index:
        p, t, d = pred.loc[c].to_numpy(), truth.loc[c].to_numpy(), de[c]
        rows.append({
            "perturbation": c.split("+")[0],
            "pearson_delta": pearson(p - ctrl, t - ctrl),
            "pearson_delta_de": pearson(p[d] - ctrl[d], t[d] - ctrl[d]),
            "mse_de": float(((p[d] - t[d]) ** 2).mean()),
        })
    return pd.DataFrame(rows)


@contextlib.contextmanager
def _quiet(enabled: bool):
    """GEARS prints every step to stdout/stderr; keep the user's terminal to our progress lines."""
    if not enabled:
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GEARS' own analyses divide by zero on unexpressed genes
        yield
