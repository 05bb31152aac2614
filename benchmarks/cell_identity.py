"""Does a model's CLS embedding carry cell identity? kNN and linear-probe accuracy of frozen cell
embeddings on labelled real cells, next to PCA of HVG log counts and a random-init model of the
same shape, over several cross-validation seeds.

    python benchmarks/cell_identity.py [--model cellfm-mini] [--seeds 0 1 2] [--max-cells 1500]

Prints one table row per data set and embedding: mean +- sd over seeds of 5-fold 15-NN accuracy
(Euclidean on the raw embedding, as `sc.pp.neighbors(use_rep=...)` sees it) and of 5-fold
logistic-regression accuracy (standardised features). The issue-8 targets are printed under it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {"pbmc3k": ("pbmc3k_clustifyr/pbmc3k_clustifyr_2000hvg.h5ad", "classified"),
        "pbmc4k": ("pbmc4k_soupx/pbmc4k_soupx_half.h5ad", "cell_type"),
        "pbmc68k": ("pbmc68k_reduced_scanpy/pbmc68k_reduced_counts.h5ad", "bulk_labels")}


def hvg_pca(path: Path, rows: np.ndarray, n_pcs: int = 50) -> np.ndarray:
    """The field's standard: normalize_total, log1p, 2,000 HVGs, scale, 50 PCs (scanpy)."""
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(path)[rows].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    if adata.n_vars > 2000:
        sc.pp.highly_variable_genes(adata, n_top_genes=2000, subset=True)
    sc.pp.scale(adata, max_value=10)
    sc.pp.pca(adata, n_comps=min(n_pcs, adata.n_vars - 1), random_state=0)
    return adata.obsm["X_pca"].astype(np.float32)


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def identity_table(model_name: str, data: Path = DATA, seeds: tuple[int, ...] = (0, 1, 2),
                   max_cells: int = 1500) -> tuple[str, dict]:
    """(Markdown table, {(data set, embedding): (kNN mean, linear mean)}) for one model."""
    import cellfm
    from cellfm.model import CellFMModule
    from cellfm.training.probe import cls_embeddings, load_probe_set, probe_accuracy

    model = cellfm.load(model_name)
    torch.manual_seed(0)
    random_init = CellFMModule(model.config)
    rows, scores = [], {}
    for name, (rel, key) in SETS.items():
        path = data / rel
        if not path.is_file():
            print(f"skip {name}: {path} not found")
            continue
        t = time.perf_counter()
        probe = load_probe_set(path, key, model.config.vocabulary, max_cells=max_cells,
                               max_genes=model.config.max_genes)
        embs = {"CellFM CLS": cls_embeddings(model.module, probe),
                "random init CLS": cls_embeddings(random_init, probe),
                "PCA of HVG log counts": hvg_pca(path, probe.rows)}
        for emb_name, emb in embs.items():
            res = [probe_accuracy(emb, probe.labels, seed=s) for s in seeds]
            knn = np.array([r["knn_acc"] for r in res])
            lin = np.array([r["linear_acc"] for r in res])
            scores[name, emb_name] = (knn.mean(), lin.mean())
            rows.append(f"| {name} ({len(probe.labels)} cells, {len(probe.classes)} types) | {emb_name} | "
                        f"{knn.mean():.3f} +- {knn.std():.3f} | {lin.mean():.3f} +- {lin.std():.3f} |")
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    head = "| data | embedding | 15-NN accuracy | linear-probe accuracy |\n|---|---|---|---|\n"
    table = head + "\n".join(rows)
    return table, scores


def targets(scores: dict) -> list[str]:
    """The issue-8 targets, met or missed, one line per data set."""
    out = []
    for name in SETS:
        if (name, "CellFM CLS") not in scores:
            continue
        knn, lin = scores[name, "CellFM CLS"]
        pca, rnd = scores[name, "PCA of HVG log counts"][0], scores[name, "random init CLS"][0]
        line = (f"{name}: kNN {knn:.3f} vs PCA-0.05 {pca - 0.05:.3f} ({_met(knn >= pca - 0.05)}), "
                f"vs random+0.20 {rnd + 0.20:.3f} ({_met(knn >= rnd + 0.20)})")
        if name == "pbmc3k":
            line += f"; linear {lin:.3f} vs 0.90 ({_met(lin >= 0.90)})"
        out.append(line)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cellfm-mini")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-cells", type=int, default=1500)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"model {args.model}; seeds {args.seeds}; <= {args.max_cells} cells per data set")
    table, scores = identity_table(args.model, args.data, tuple(args.seeds), args.max_cells)
    print("\n" + table)
    print("\nissue-8 targets (CellFM kNN >= PCA - 0.05 and >= random + 0.20; linear >= 0.90 on pbmc3k):")
    print("\n".join("  " + line for line in targets(scores)))


if __name__ == "__main__":
    main()
