"""Cell type annotation on CPU: what frozen-mode training costs, and how well it annotates.

1. cost (why frozen mode caches token states): one encoder pass over the reference cells
   (`TokenStates.compute`), one epoch of the official head on the cached fp16 states
   (forward + backward, batch 32), and the cache's size. Recomputing the encoder every epoch
   instead would cost (encoder pass over the training cells + head epoch) per epoch.
2. quality: `evaluate_annotation` (stratified 80/20 split, seed fixed) of the annotator in
   frozen mode with each head against logistic regression on 50 PCs of HVGs and kNN.

  python benchmarks/annotation.py                              # pbmc3k, cellfm-mini, both heads
  python benchmarks/annotation.py --heads official --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def cost(adata, label_key: str, model, batch_size: int) -> list[dict]:
    from cellfm.model.cell_type_head import CellTypeHead
    from cellfm.tasks.annotation_cache import TokenStates
    from cellfm.tasks.annotation_data import stratified_split
    from cellfm.tasks.annotation_training import frozen_epoch_fn

    cpu = torch.device("cpu")
    t = time.perf_counter()
    cache = TokenStates.compute(adata, model, cpu, progress=False)
    encode_s = time.perf_counter() - t
    classes, y = np.unique(adata.obs[label_key].astype(str).to_numpy(), return_inverse=True)
    train_idx, val_idx = stratified_split(y, 0.1, 0)
    head = CellTypeHead(model.config.d_model, model.config.n_heads, len(classes))
    epoch = frozen_epoch_fn(head, cache, y, train_idx, val_idx, None, 1e-3, batch_size, cpu, 0)
    t = time.perf_counter()
    for _ in range(2):
        epoch()
    epoch_s = (time.perf_counter() - t) / 2
    share = len(train_idx) / len(y)
    return [
        {
            "what": f"encoder pass, {adata.n_obs} cells ({int(cache.lengths.sum())} tokens)",
            "seconds": encode_s,
        },
        {
            "what": f"head epoch on cached states, mean of 2 ({len(train_idx)} + {len(val_idx)} val cells)",
            "seconds": epoch_s,
        },
        {
            "what": "per epoch if the encoder were recomputed (train cells)",
            "seconds": encode_s * share + epoch_s,
        },
        {"what": f"cache size {cache.tokens.nbytes / 2**20:.0f} MiB fp16", "seconds": float("nan")},
    ]


def main() -> None:
    import cellfm
    from cellfm.evaluation.data import BENCHMARKS, load_benchmark
    from cellfm.tasks.annotation_eval import evaluate_annotation

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="pbmc3k", choices=[k for k, v in BENCHMARKS.items() if v.label_key])
    ap.add_argument("--model", default="cellfm-mini")
    ap.add_argument("--heads", nargs="+", default=["official", "cls_mlp"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-cost", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    adata = load_benchmark(args.data)
    key = BENCHMARKS[args.data].label_key
    model = cellfm.load(args.model)
    print(f"{args.data}: {adata.n_obs} cells, model {args.model}, {torch.get_num_threads()} threads")
    if not args.skip_cost:
        print(f"\n{'frozen-mode cost':<75} {'seconds':>8}")
        for row in cost(adata, key, model, 32):
            print(f"{row['what']:<75} {row['seconds']:>8.1f}")
    rows = []
    for head in args.heads:
        t = time.perf_counter()
        r = evaluate_annotation(adata, key, model, mode="frozen", head=head, progress=False)
        fit_s = time.perf_counter() - t
        for _, m in r["table"].iterrows():
            if m["method"].startswith("CellFM") or head == args.heads[0]:
                name = f"{m['method']} {head}" if m["method"].startswith("CellFM") else m["method"]
                rows.append(
                    (
                        name,
                        m["accuracy"],
                        m["macro_f1"],
                        f"{fit_s:.0f} s, {r['rejected_fraction']:.1%} unknown, "
                        f"{'; '.join(s['reason'] for s in r['stops'])}"
                        if m["method"].startswith("CellFM")
                        else "",
                    )
                )
    print(f"\n{'method':<28} {'accuracy':>8} {'macro-F1':>8}  notes")
    for name, acc, f1, note in rows:
        print(f"{name:<28} {acc:>8.3f} {f1:>8.3f}  {note}")


if __name__ == "__main__":
    main()
