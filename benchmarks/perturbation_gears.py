"""GEARS vs GEARS + CellFM gene tokens vs simple baselines on unseen knock-outs (Papalexi 2021
ECCITE-seq screen), GEARS' simulation split for several seeds (`cellfm.tasks.perturbation_benchmark`).

    python benchmarks/perturbation_gears.py [--model cellfm-mini] [--seeds 1 2 3] [--epochs 10]
        [--max-cells-per-condition 200] [--out perturbation_gears.tsv]

Needs `pip install "cellfm[gears]"`. Prints a Markdown table (mean ± sd over seeds of the
per-perturbation means) and writes the per-perturbation scores to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    import cellfm
    from cellfm.evaluation.data import load_benchmark
    from cellfm.tasks.perturbation_benchmark import evaluate_perturbation_gears, perturbation_markdown
    from cellfm.tasks.perturbation_gears import GearsConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cellfm-mini")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=GearsConfig.epochs)
    p.add_argument("--max-cells-per-condition", type=int, default=200)
    p.add_argument("--hidden-size", type=int, default=GearsConfig.hidden_size)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("perturbation_gears.tsv"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = GearsConfig(epochs=args.epochs, hidden_size=args.hidden_size,
                      max_cells_per_condition=args.max_cells_per_condition)
    t0 = time.time()
    adata = load_benchmark("papalexi", args.data)
    r = evaluate_perturbation_gears(adata, cellfm.load(args.model), args.data / "go_annotations_org_hs_eg_db",
                                    seeds=tuple(args.seeds), config=cfg, size_factor_key="response_n_umis")
    tmp = args.out.with_suffix(".tmp")
    r["per_perturbation"].to_csv(tmp, sep="\t", index=False)
    tmp.replace(args.out)
    print(f"\nmodel {args.model}; {cfg}; split seeds {args.seeds}; {time.time() - t0:.0f} s")
    print(perturbation_markdown(r["table"]))


if __name__ == "__main__":
    main()
