"""Drug and stimulus response with CellOT: learn the map from control to treated cells and score
it on held-out cells (i.i.d.) or held-out groups (out of distribution), as Bunne et al. evaluate.

    AnnData (raw counts, obs[condition_key]: control / treated conditions)
    -> checked and log-normalised once (perturbation.read_screen); HVGs = common space
    -> spaces: CellFM cell embeddings (the CellFM paper's setting), PCA of the HVGs (fitted on
       each split's training cells; CellOT's reference), the HVG expression itself (baselines only)
    -> per split x treated condition x space: identity, mean shift, CellOT (tasks.cellot)
    -> scores in the own space and, through a ridge decoder fitted on the split's training cells,
       in HVG expression (tasks.response_scores); the predicted cells in expression.

Splits: "iid" holds out a seeded `test_fraction` of every condition's cells; "ood" (with
`group_key`) holds out each group in turn: the map is fitted on the other groups and moves the
held-out group's control cells, which are compared with that group's treated cells.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from cellfm.tasks.cellot import CellOTConfig, fit_cellot
from cellfm.tasks.perturbation import read_screen
from cellfm.tasks.response_scores import METRICS, RidgeDecoder, population_scores
from cellfm.wording import UsageError, arg

if TYPE_CHECKING:
    from cellfm.cellfm import CellFM

SPACES = ("cellfm", "pca", "expression")


@dataclass(frozen=True)
class ResponseConfig:
    """What `predict_response` reads and how it splits, embeds and fits.

    `treated`: the treated conditions (empty: every condition but the control). `spaces`: any of
    "cellfm", "pca", "expression" (the last runs the baselines only: CellOT on every HVG is not
    CellOT's setting). `cellot.iters` is below CellOT's 100k steps so a CPU finishes in minutes.
    """

    condition_key: str = "condition"
    control: str = "ctrl"
    treated: tuple[str, ...] = ()
    group_key: str | None = None
    size_factor_key: str | None = None
    n_hvg: int = 1000
    n_pcs: int = 50
    test_fraction: float = 0.3
    max_cells_per_condition: int | None = None
    min_cells: int = 10
    spaces: tuple[str, ...] = SPACES
    cellot: CellOTConfig = field(default_factory=lambda: CellOTConfig(iters=200))
    batch_size: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class ResponseResult:
    """`scores`: one row per method x space x setting x held-out set x treated condition (metrics
    in the own space, and with suffix `_expr` in HVG expression); `predicted`: every predicted
    cell in HVG expression, obs naming its method, space, setting, held-out set, treated
    condition and source control cell."""

    scores: pd.DataFrame
    predicted: ad.AnnData
    config: ResponseConfig


def predict_response(
    adata: ad.AnnData, model: CellFM | None, config: ResponseConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> ResponseResult:
    """Fit control -> treated maps (identity, mean shift, CellOT) in each space and score them.

    `model` embeds the cells for the "cellfm" space (None: leave that space out). Errors name
    the argument (or CLI flag) to fix: a missing column, an unknown control or treated condition,
    counts that are not raw.
    """
    cfg = config or ResponseConfig()
    say = log or (lambda _msg: None)
    _check_config(cfg)
    screen = read_screen(adata, cfg.condition_key, cfg.control, cfg.size_factor_key, model)
    treated = _treated(screen.conditions, cfg)
    groups = _groups(adata, cfg.group_key)
    keep = _subsample(screen.conditions, [cfg.control, *treated], cfg.max_cells_per_condition, cfg.seed)
    cond = screen.conditions[keep]
    values = screen.values[keep]
    hvg = _top_variance(values, cfg.n_hvg)
    E = np.asarray(values[:, hvg].todense(), dtype=np.float32)  # (n, h) the common space
    genes = screen.genes[hvg]
    spaces = tuple(s for s in cfg.spaces if s != "cellfm" or model is not None)
    emb = None
    if "cellfm" in spaces:
        t0 = time.time()
        emb = model.get_cell_embeddings(adata[keep], batch_size=cfg.batch_size, progress=False)
        say(f"CellFM embeddings of {len(keep)} cells in {time.time() - t0:.0f} s")
    rows, pred_blocks, pred_obs = [], [], []
    for setting, held_out, train in _splits(len(keep), groups[keep] if groups is not None else None, cfg):
        for t in treated:
            idx = {name: np.flatnonzero(m) for name, m in [
                ("src_tr", train & (cond == cfg.control)), ("tgt_tr", train & (cond == t)),
                ("src_te", ~train & (cond == cfg.control)), ("tgt_te", ~train & (cond == t))]}
            if min(len(v) for v in idx.values()) < cfg.min_cells:
                say(f"{setting} {held_out} {t}: fewer than {cfg.min_cells} cells in a part, left out")
                continue
            for space in spaces:
                t0 = time.time()
                for method, P_own, P_expr, Z_src, Z_tgt in _predict(space, E, emb, idx, cfg):
                    row = {"method": method, "space": space, "setting": setting, "held_out": held_out,
                           "treated": t, "n_source": len(idx["src_te"]), "n_observed": len(idx["tgt_te"])}
                    own = population_scores(P_own, Z_tgt, Z_src, cfg.seed)
                    common = population_scores(P_expr, E[idx["tgt_te"]], E[idx["src_te"]], cfg.seed)
                    row.update(own)
                    row.update({f"{m}_expr": common[m] for m in METRICS})
                    rows.append(row)
                    pred_blocks.append(P_expr)
                    pred_obs.append(pd.DataFrame({
                        "method": method, "space": space, "setting": setting, "held_out": held_out,
                        "treated": t, "source_cell": screen.obs_names[keep][idx["src_te"]]}))
                say(f"{setting} {held_out} {t} {space}: {time.time() - t0:.0f} s")
    if not rows:
        raise ValueError(f"no split has {cfg.min_cells} control and treated cells on both sides; "
                         f"lower {arg('min_cells', placeholder='n')} or pass more cells")
    obs = pd.concat(pred_obs, ignore_index=True)
    obs.index = obs.index.astype(str)
    predicted = ad.AnnData(np.concatenate(pred_blocks).astype(np.float32), obs=obs.astype(str),
                           var=pd.DataFrame(index=pd.Index(genes, name="gene")))
    predicted.uns["cellfm_response"] = {"common_space": "log1p(count / total * 1e4) of the HVGs",
                                        "decoder": "ridge on standardised features, training cells"}
    return ResponseResult(pd.DataFrame(rows), predicted, cfg)


def _predict(space: str, E: np.ndarray, emb: np.ndarray | None, idx: dict, cfg: ResponseConfig):
    """(method, prediction in the own space, prediction in expression, own-space source cells,
    own-space observed cells) for each method of one split, treated condition and space."""
    fit_rows = np.concatenate([idx["src_tr"], idx["tgt_tr"]])
    if space == "expression":
        Z, decode = E, None
    elif space == "pca":
        k = min(cfg.n_pcs, E.shape[1], len(fit_rows) - 1)
        Z = PCA(k, random_state=cfg.seed).fit(E[fit_rows]).transform(E).astype(np.float32)
        decode = RidgeDecoder(Z[fit_rows], E[fit_rows])
    else:
        Z = emb
        decode = RidgeDecoder(Z[fit_rows], E[fit_rows])
    src_tr, tgt_tr, src_te, tgt_te = (Z[idx[k]] for k in ("src_tr", "tgt_tr", "src_te", "tgt_te"))
    preds = {"identity": src_te, "mean shift": src_te + (tgt_tr.mean(0) - src_tr.mean(0))}
    if space != "expression":
        preds["CellOT"] = fit_cellot(src_tr, tgt_tr, cfg.cellot).predict(src_te).astype(np.float32)
    for method, P in preds.items():
        yield method, P, (P if decode is None else decode(P)), src_te, tgt_te


def _splits(n: int, groups: np.ndarray | None, cfg: ResponseConfig):
    """(setting, held-out name, training mask) of the i.i.d. split and of each held-out group."""
    rng = np.random.default_rng(cfg.seed)
    yield "iid", f"random {cfg.test_fraction:.0%} of cells", rng.random(n) >= cfg.test_fraction
    if groups is not None:
        for g in sorted(pd.unique(groups)):
            yield "ood", str(g), groups != g


def _check_config(cfg: ResponseConfig) -> None:
    if not 0 < cfg.test_fraction < 1:
        raise UsageError(f"{arg('test_fraction', cfg.test_fraction)} must lie between 0 and 1")
    unknown = sorted(set(cfg.spaces) - set(SPACES))
    if unknown or not cfg.spaces:
        raise UsageError(f"{arg('spaces')} must name some of {', '.join(SPACES)}; got {list(cfg.spaces)}")
    if cfg.n_hvg < 2 or cfg.n_pcs < 1:
        raise UsageError(f"{arg('n_hvg')} must be >= 2 and {arg('n_pcs')} >= 1")


def _treated(cond: np.ndarray, cfg: ResponseConfig) -> list[str]:
    present = set(cond.tolist())
    treated = list(cfg.treated) or sorted(present - {cfg.control})
    unknown = [t for t in treated if t not in present]
    if unknown:
        sample = ", ".join(sorted(present - {cfg.control})[:8])
        raise UsageError(f"obs[{cfg.condition_key!r}] has no condition {unknown[0]!r}; pass "
                         f"{arg('treated', placeholder='condition')} with one of: {sample}")
    if cfg.control in treated:
        raise UsageError(f"{cfg.control!r} is the control; pass other conditions as "
                         f"{arg('treated', placeholder='condition')}")
    if not treated:
        raise ValueError(f"obs[{cfg.condition_key!r}] holds only the control {cfg.control!r}")
    return treated


def _groups(adata: ad.AnnData, group_key: str | None) -> np.ndarray | None:
    if group_key is None:
        return None
    if group_key not in adata.obs.columns:
        raise KeyError(f"obs has no column {group_key!r} (columns: {list(adata.obs.columns)}); pass "
                       f"{arg('group_key', placeholder='column')} with the group to hold out "
                       "(cell type, donor, replicate)")
    groups = adata.obs[group_key].astype(str).to_numpy()
    if len(set(groups.tolist())) < 2:
        raise ValueError(f"obs[{group_key!r}] has a single group; {arg('group_key')} needs two or more")
    return groups


def _subsample(cond: np.ndarray, names: list[str], cap: int | None, seed: int) -> np.ndarray:
    """Sorted row indices of the named conditions, at most `cap` cells each (seeded)."""
    rng = np.random.default_rng(seed)
    parts = []
    for c in names:
        rows = np.flatnonzero(cond == c)
        if cap and len(rows) > cap:
            rows = rng.choice(rows, cap, replace=False)
        parts.append(rows)
    return np.sort(np.concatenate(parts))


def _top_variance(values, n: int) -> np.ndarray:
    """Column indices of the `n` genes whose log-normalised expression varies most (sorted)."""
    mean = np.asarray(values.mean(0)).ravel()
    var = np.asarray(values.multiply(values).mean(0)).ravel() - mean**2
    return np.sort(np.argsort(-var, kind="stable")[: min(n, len(var))])
