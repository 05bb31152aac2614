"""GEARS vs GEARS + CellFM gene tokens vs simple baselines on unseen knock-outs (Papalexi 2021
ECCITE-seq screen), GEARS' simulation split for several seeds (`cellfm.tasks.perturbation_benchmark`).

    python benchmarks/perturbation_gears.py [--model cellfm-mini] [--data-dir FOLDER] [--seeds 1 2 3]
        [--epochs 10] [--max-cells-per-condition 200] [--no-reverse] [--out perturbation_gears.tsv]
    python benchmarks/perturbation_gears.py --celleval-reference-of OUT/cell_eval

The data folder (the one holding papalexi2021_eccite_sceptre/ and go_annotations_org_hs_eg_db/)
is --data-dir, else CELLFM_DATA_DIR. Needs `pip install "cellfm[gears]"`; with cell-eval installed
(`cellfm[perteval]`) its scores (DES, PDS, MAE, rank-based) join the forward table. Prints the
forward table and the reverse-perturbation table (Markdown, mean ± sd over seeds of the
per-perturbation means) and writes the per-perturbation scores to --out and the reverse ones to
--out with the suffix `.reverse.tsv`.

`--celleval-reference-of DIR` (a `cell_eval` folder written by `cellfm perturb` or --celleval-dir)
prints the levels cell-eval's scores can reach there instead: per split, the real cells scored as
their own prediction, and the true mean profile of each perturbation put through our layout
(control cells + shift) and through cell-eval's baseline layout (every cell = the mean).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

import cellfm
from cellfm.evaluation.data import load_benchmark, resolve_data_dir
from cellfm.tasks.perturbation_benchmark import evaluate_perturbation_gears, perturbation_markdown
from cellfm.tasks.perturbation_celleval import PERT_COL, celleval_layout, celleval_scores
from cellfm.tasks.perturbation_gears import GearsConfig
from cellfm.tasks.perturbation_reverse import reverse_markdown


def _write_tsv(df, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, sep="\t", index=False)
    tmp.replace(path)


def celleval_reference(folder: Path, control: str = "ctrl") -> pd.DataFrame:
    """Mean ± sd over the `seed*/` splits in `folder` of cell-eval's scores for three references."""
    rows = []
    for split in sorted(folder.glob("seed*")):
        real = ad.read_h5ad(split / "real.h5ad")
        labels = real.obs[PERT_COL].astype(str).to_numpy()
        perts = [p for p in pd.unique(labels) if p != control]
        X = np.asarray(real.X.toarray() if hasattr(real.X, "toarray") else real.X, dtype=np.float32)
        truth = pd.DataFrame(np.stack([X[labels == p].mean(0) for p in perts]), index=perts,
                             columns=real.var_names)
        cells = real.copy()
        cells.obs["condition"] = labels
        real_l, preds = celleval_layout(cells, perts, control, {"true mean, control cells + shift": truth})
        order = np.argsort(labels != control, kind="stable")  # controls first, as our layout has them
        const = X[order].copy()
        for p in perts:
            const[labels[order] == p] = truth.loc[p].to_numpy(np.float32)
        obs = pd.DataFrame({PERT_COL: labels[order]}, index=[f"c{i}" for i in range(len(order))])
        preds["true mean, every cell = the mean (cell-eval baseline)"] = ad.AnnData(const, obs=obs,
                                                                                   var=real.var.copy())
        preds["real cells (perfect)"] = real_l.copy()
        scores = celleval_scores(real_l, preds, control)
        scores.insert(0, "seed", split.name)
        rows.append(scores)
    per = pd.concat(rows, ignore_index=True)
    cols = [c for c in per.columns if c.startswith("ce_")]
    by_seed = per.groupby(["method", "seed"], sort=False)[cols].mean()
    mean = by_seed.groupby(level=0, sort=False).mean()
    sd = by_seed.groupby(level=0, sort=False).std(ddof=0).add_suffix("_sd")
    return pd.concat([mean, sd], axis=1).reset_index()


def main() -> None:
    p = argparse.ArgumentParser(description="GEARS, GEARS + CellFM and baselines on Papalexi's unseen "
                                "knock-outs; reverse perturbation; cell-eval scores when installed.")
    p.add_argument("--model", default="cellfm-mini")
    p.add_argument("--data-dir", "--data", dest="data", type=Path, default=None, metavar="FOLDER",
                   help="evaluation data folder (default: CELLFM_DATA_DIR)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=GearsConfig.epochs)
    p.add_argument("--max-cells-per-condition", type=int, default=200)
    p.add_argument("--hidden-size", type=int, default=GearsConfig.hidden_size)
    p.add_argument("--no-reverse", dest="reverse", action="store_false",
                   help="skip reverse perturbation")
    p.add_argument("--celleval-dir", type=Path, default=None,
                   help="also write each split's real and predicted cells in cell-eval's layout here")
    p.add_argument("--celleval-reference-of", type=Path, default=None, metavar="CELL_EVAL_DIR",
                   help="only print cell-eval's reference levels for the splits in this folder")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("perturbation_gears.tsv"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.celleval_reference_of is not None:
        ref = celleval_reference(args.celleval_reference_of)
        print(ref.set_index("method").T.round(3).to_string())
        return
    data = resolve_data_dir(args.data)
    cfg = GearsConfig(epochs=args.epochs, hidden_size=args.hidden_size,
                      max_cells_per_condition=args.max_cells_per_condition or None)
    t0 = time.time()
    adata = load_benchmark("papalexi", data)
    r = evaluate_perturbation_gears(adata, cellfm.load(args.model), data / "go_annotations_org_hs_eg_db",
                                    seeds=tuple(args.seeds), config=cfg, size_factor_key="response_n_umis",
                                    reverse=args.reverse, celleval_dir=args.celleval_dir)
    _write_tsv(r.per_perturbation, args.out)
    print(f"\nmodel {args.model}; {cfg}; split seeds {args.seeds}; {time.time() - t0:.0f} s\n")
    print("## Unseen knock-outs (mean ± sd over splits)\n")
    print(perturbation_markdown(r.table, r.celleval_note))
    if r.reverse is not None:
        _write_tsv(r.reverse_per_perturbation, args.out.with_suffix(".reverse.tsv"))
        print("\n## Reverse perturbation (top-k accuracy, mean ± sd over splits)\n")
        print(reverse_markdown(r.reverse))


if __name__ == "__main__":
    main()
