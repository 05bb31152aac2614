"""Reverse perturbation: given the observed profile of an unseen perturbation, which perturbation
caused it?

For every observed test perturbation, every candidate perturbation (each target of the screen on
its own; every pair of targets when the screen has combinations) is ranked by the Euclidean
distance between a method's *predicted* mean profile for that candidate and the *observed* mean
profile. A method scores a hit at k when the true perturbation is among the k closest. Ties (a
method predicting the same profile for several candidates, like the mean baseline) are broken
uniformly at random in expectation, so a method that cannot tell candidates apart scores chance,
k / n_candidates.

The retrieval baseline predicts a candidate by the observed profile of that perturbation in the
training data, and a pair by adding its two single effects (the additive baseline) when both were
trained on; it cannot name a perturbation it never saw, which is the point of comparing with it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import torch

KS = (1, 3, 10)


def targets_of(condition: str) -> tuple[str, ...]:
    """Sorted perturbed genes of a GEARS-style condition ("A+ctrl", "A+B")."""
    return tuple(sorted(g for g in condition.split("+") if g != "ctrl"))


def condition_name(genes: tuple[str, ...]) -> str:
    """GEARS' name of a one- or two-gene perturbation, genes sorted ("A+ctrl", "A+B")."""
    return f"{genes[0]}+ctrl" if len(genes) == 1 else "+".join(genes)


def candidate_conditions(conditions: list[str]) -> list[str]:
    """Every target of the screen alone, and every pair of targets when the screen has pairs."""
    genes = sorted({g for c in conditions for g in targets_of(c)})
    out = [condition_name((g,)) for g in genes]
    if any(len(targets_of(c)) > 1 for c in conditions):
        out += [condition_name(p) for p in itertools.combinations(genes, 2)]
    return out


def retrieval_profiles(train: pd.DataFrame, ctrl_mean: np.ndarray, candidates: list[str]) -> pd.DataFrame:
    """Training profiles as predictions; pairs additive from trained singles; NaN where unknown."""
    by_genes = {targets_of(c): train.loc[c].to_numpy() for c in train.index}
    out = np.full((len(candidates), train.shape[1]), np.nan)
    for i, c in enumerate(candidates):
        genes = targets_of(c)
        if genes in by_genes:
            out[i] = by_genes[genes]
        elif len(genes) == 2 and all((g,) in by_genes for g in genes):
            out[i] = ctrl_mean + sum(by_genes[(g,)] - ctrl_mean for g in genes)  # additive
    return pd.DataFrame(out, index=candidates, columns=train.columns)


def additive_pairs(singles: pd.DataFrame, ctrl_mean: np.ndarray, candidates: list[str]) -> pd.DataFrame:
    """A method's profiles for `candidates`: its single predictions, pairs as the sum of its two
    single effects (how a single-perturbation predictor ranks combinations)."""
    by_gene = {targets_of(c)[0]: singles.loc[c].to_numpy() for c in singles.index if len(targets_of(c)) == 1}
    rows = []
    for c in candidates:
        genes = targets_of(c)
        if c in singles.index:
            rows.append(singles.loc[c].to_numpy())
        else:
            rows.append(ctrl_mean + sum(by_gene[g] - ctrl_mean for g in genes))
    return pd.DataFrame(np.stack(rows), index=candidates, columns=singles.columns)


def rank_hits(observed: pd.DataFrame, predicted: pd.DataFrame, ks: tuple[int, ...] = KS) -> pd.DataFrame:
    """Per observed perturbation: expected top-k hits under random tie-breaking, the true
    candidate's distance rank, and the number of candidates. `predicted` rows with NaN never win."""
    P = predicted.to_numpy(dtype=np.float64)
    names = {targets_of(c): i for i, c in enumerate(predicted.index)}
    rows = []
    for c in observed.index:
        truth = names.get(targets_of(c))
        if truth is None:
            raise ValueError(f"{c!r} is not among the candidate perturbations")
        d = np.sqrt(((P - observed.loc[c].to_numpy()) ** 2).sum(1))
        d[~np.isfinite(d)] = np.inf
        closer = int((d < d[truth]).sum())
        tied = int((d == d[truth]).sum()) - 1
        row = {"perturbation": c, "rank": closer + 1 + tied / 2, "n_candidates": len(d)}
        for k in ks:  # true position uniform over closer+1 .. closer+tied+1
            row[f"top{k}"] = float(np.clip((k - closer) / (tied + 1), 0.0, 1.0))
        rows.append(row)
    return pd.DataFrame(rows)


def summarise_reverse(per: pd.DataFrame, ks: tuple[int, ...] = KS) -> pd.DataFrame:
    """Mean over perturbations within a seed, then mean and sd over seeds; chance = k / n."""
    cols = [f"top{k}" for k in ks]
    per = per.assign(**{f"chance_top{k}": np.minimum(k / per.n_candidates, 1.0) for k in ks})
    chance = [f"chance_top{k}" for k in ks]
    by_seed = per.groupby(["method", "seed"], sort=False)[cols + chance + ["n_candidates"]].mean()
    mean = by_seed.groupby(level=0, sort=False).mean()
    sd = by_seed.groupby(level=0, sort=False)[cols].std(ddof=0).add_suffix("_sd")
    return pd.concat([mean, sd], axis=1).sort_values("top1", ascending=False).reset_index()


def reverse_markdown(table: pd.DataFrame, ks: tuple[int, ...] = KS) -> str:
    """The reverse-perturbation table as Markdown, mean ± sd over splits, chance in the last row."""
    head = "| method | " + " | ".join(f"top-{k} ↑" for k in ks) + " |\n|---|" + "---|" * len(ks)
    lines = [head]
    for _, r in table.iterrows():
        lines.append(f"| {r['method']} | " + " | ".join(f"{r[f'top{k}']:.3f} ± {r[f'top{k}_sd']:.3f}"
                                                      for k in ks) + " |")
    n = table.n_candidates.iloc[0] if len(table) else float("nan")
    lines.append(f"| chance ({n:.0f} candidates) | "
                 + " | ".join(f"{table[f'chance_top{k}'].iloc[0]:.3f}" for k in ks) + " |")
    return "\n".join(lines)


@torch.inference_mode()
def gears_candidate_profiles(model: torch.nn.Module, control_graphs: list, pert_index: dict[str, int],
                             candidates: list[str], genes: list[str], batch_size: int = 64) -> pd.DataFrame:
    """Mean GEARS prediction of each candidate perturbation applied to the same control cells.

    `control_graphs`: GEARS cell graphs of control cells (their `x`, and `z` for the CellFM
    adapter); `pert_index`: GEARS' `node_map_pert` (gene -> perturbation index).
    """
    from torch_geometric.data import Batch  # optional extra, with GEARS

    model = model.eval()
    dev = next(model.parameters()).device
    rows = []
    for c in candidates:
        idx = [pert_index[g] for g in targets_of(c)]
        total = torch.zeros(len(genes), dtype=torch.float64)
        for s in range(0, len(control_graphs), batch_size):
            part = []
            for g in control_graphs[s : s + batch_size]:
                h = g.clone()
                h.pert_idx = idx
                part.append(h)
            out = model(Batch.from_data_list(part).to(dev))  # (B, G)
            total += out.double().sum(0).cpu()
        rows.append((total / len(control_graphs)).numpy())
    return pd.DataFrame(np.stack(rows), index=candidates, columns=genes)
