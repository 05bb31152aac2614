"""Does a model's CLS embedding carry cell identity? kNN and linear-probe accuracy of frozen cell
embeddings on labelled real cells, next to PCA of HVG log counts and a random-init model of the
same shape, over several cross-validation seeds (`cellfm.evaluation.cell_identity`).

    python benchmarks/cell_identity.py [--model cellfm-mini] [--data-dir FOLDER] [--seeds 0 1 2]
        [--max-cells 1500]        # data: --data-dir or CELLFM_DATA_DIR

Prints one table row per data set and embedding (mean +- sd over seeds of 5-fold 15-NN accuracy,
Euclidean on the raw embedding as `sc.pp.neighbors(use_rep=...)` sees it, and of 5-fold
logistic-regression accuracy), then whether the targets of a useful CLS are met.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cellfm.evaluation.cell_identity import evaluate_cell_identity, identity_markdown, identity_targets


def identity_table(model_name: str, data: Path | None = None, seeds: tuple[int, ...] = (0, 1, 2),
                   max_cells: int = 1500) -> tuple[str, list[str]]:
    """(Markdown table, target lines) for one model; `data` None: CELLFM_DATA_DIR."""
    table = evaluate_cell_identity(model_name, data, seeds=seeds, max_cells=max_cells, progress=True)
    return identity_markdown(table), identity_targets(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cellfm-mini")
    p.add_argument("--data-dir", "--data", dest="data", type=Path, default=None,
                   help="evaluation data folder (default: CELLFM_DATA_DIR)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-cells", type=int, default=1500)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"model {args.model}; seeds {args.seeds}; <= {args.max_cells} cells per data set")
    table, targets = identity_table(args.model, args.data, tuple(args.seeds), args.max_cells)
    print("\n" + table)
    print("\ntargets (CellFM kNN >= PCA - 0.05 and >= random + 0.20; linear >= 0.90 on pbmc3k):")
    print("\n".join("  " + line for line in targets))


if __name__ == "__main__":
    main()
