"""Cell type annotation: controlled runs of the annotation heads against two baselines.

For each labelled data set and model, the encoder runs once over all cells (cached states, as
frozen mode does). Per seed, a stratified 80/20 split; on the 80 % each head setting is trained
(validation carved from the 80 %, as `fit` does) and every method is scored by macro-F1 on the
same 20 %:
- official head, by setting (raw or standardised encoder states, learning rate, class weights),
  scored through its token path (the official prediction: "official forced") and its CLS path;
- the CLS linear head (logistic regression on the training cells' CLS, minus the validation);
- "auto" (the default): the official head if it beat the linear head on the validation cells by
  more than 0.02 macro-F1, else the linear head refitted on the whole 80 % (= logreg CLS);
- logistic regression on the model's CLS and on 50 PCs of log counts, fitted on the whole 80 %.

  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/annotation.py --data pbmc68k pbmc3k \
      --models cellfm-mini preset:small --seeds 0 1 2 --max-epochs 20 --csv annotation_runs.csv

`--max-epochs` caps the official head's epochs (default 40, patience 5) to fit CPU time.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import cellfm
from cellfm.config import PRESETS
from cellfm.contract import setup_cells
from cellfm.evaluation.baselines import pca_logistic_regression
from cellfm.evaluation.data import BENCHMARKS, load_benchmark, resolve_data_dir
from cellfm.tasks.annotation import AnnotatorConfig, CellTypeAnnotator
from cellfm.tasks.annotation.cross_dataset import annotate_across, read_ontology
from cellfm.tasks.annotation.reference import checked_labels, validation_split
from cellfm.tasks.annotation.selection import choose_head, train_head
from cellfm.tasks.annotation.states import TokenStates

CPU = torch.device("cpu")
BASE = AnnotatorConfig(progress=False, device="cpu")
SETTINGS = {  # name -> config of the official head
    "raw states (before)": replace(BASE, standardise_states=False),
    "standardised states (now)": BASE,
    "raw states, head_lr 1e-4": replace(BASE, standardise_states=False, head_lr=1e-4),
    "standardised, head_lr 1e-4": replace(BASE, head_lr=1e-4),
    "standardised, no class weights": replace(BASE, class_weights=False),
}
DEFAULT_SETTINGS = ["raw states (before)", "standardised states (now)"]
COLS = ["official token", "official cls", "cls_linear", "auto", "logreg CLS", "logreg PCA"]


def load_model(name: str) -> cellfm.CellFM:
    if name.startswith("preset:") and name[7:] in PRESETS:
        torch.manual_seed(0)
        return cellfm.CellFM.from_preset(name[7:])
    return cellfm.load(name)


def f1(y, pred) -> float:
    return float(f1_score(y, pred, average="macro"))


@torch.no_grad()
def official_paths(head, cache: TokenStates, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Predicted classes of `rows` by the token path and the CLS path."""
    head.eval()
    tok, cls = [], []
    for a in range(0, len(rows), 128):
        states, mask = cache.batch(rows[a : a + 128], CPU)
        t, c = head(states, mask)
        tok.append(t.argmax(1)), cls.append(c.argmax(1))
    return {"token": torch.cat(tok).numpy(), "cls": torch.cat(cls).numpy()}


def run(adata, key: str, model, seeds: list[int], log, max_cells: int | None = None,
        max_epochs: int | None = None) -> list[dict]:
    labels = checked_labels(adata, key, 5)
    keep = np.flatnonzero(labels.notna().to_numpy())
    if max_cells and len(keep) > max_cells:  # a stratified subsample, the same for every model
        keep, _ = train_test_split(keep, train_size=max_cells, stratify=labels.iloc[keep].astype(str),
                                   random_state=0)
        keep = np.sort(keep)
    adata = adata[keep].copy()
    classes, y = np.unique(labels.iloc[keep].astype(str).to_numpy(), return_inverse=True)
    t = time.perf_counter()
    cache = TokenStates.compute(setup_cells(adata, model, empty="zero"), model, CPU, progress=False)
    log(f"  encoded {adata.n_obs} cells in {time.perf_counter() - t:.0f} s")
    rows = []
    for seed in seeds:
        tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=seed)
        tr, te = np.sort(tr), np.sort(te)
        row = {"seed": seed}
        scaler = StandardScaler().fit(cache.cls[tr])
        clf = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
        row["logreg CLS"] = f1(y[te], clf.fit(scaler.transform(cache.cls[tr]), y[tr]).predict(
            scaler.transform(cache.cls[te])))
        row["logreg PCA"] = f1(y[te], pca_logistic_regression(adata.X[tr], y[tr], adata.X[te], seed=seed))
        for name, cfg in SETTINGS.items():
            cfg = replace(cfg, seed=seed, max_epochs=max_epochs or cfg.max_epochs)
            a, b = validation_split(y[tr], cfg.val_fraction, cfg.min_val_cells, seed)
            split = (tr[a], tr[b])
            counts = np.bincount(y[split[0]], minlength=len(classes))
            weight = torch.tensor(len(split[0]) / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32)
            t = time.perf_counter()
            heads, hist = {}, []
            heads["official"], stop = train_head("official", model.config, len(classes), cache, y, split,
                                                 weight if cfg.class_weights else None, cfg, CPU, hist)
            heads["cls_linear"], _ = train_head("cls_linear", model.config, len(classes), cache, y, split,
                                                None, cfg, CPU, hist)
            chosen, sel = choose_head(heads, cache, y, split[1], cfg.selection_margin)
            paths = official_paths(heads["official"], cache, te)
            lin = heads["cls_linear"].logits(torch.from_numpy(cache.cls[te])[:, None], None).argmax(1).numpy()
            scores = {f"official {k}": f1(y[te], p) for k, p in paths.items()}
            scores["cls_linear"] = f1(y[te], lin)
            # a kept linear head is refitted on all training cells: logistic regression on the CLS
            scores["auto"] = scores["official token"] if chosen == "official" else row["logreg CLS"]
            rows.append({**row, "setting": name, **scores, "auto kept": chosen, "epochs": stop["epochs_run"],
                         "best": stop["best_epoch"], "n_val": len(split[1]),
                         "seconds": time.perf_counter() - t})
            log(f"  seed {seed} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
                + f"; baselines CLS {row['logreg CLS']:.3f} PCA {row['logreg PCA']:.3f}; {stop['reason']}")
    return rows


def unknown_share(adata, key: str, model, seeds: list[int], log, max_epochs: int | None = None,
                  head: str = "auto") -> list[dict]:
    """End to end (`fit` on 80 %, `predict` the other 20 %): the share of held-out cells, from the
    reference's own distribution, that the default annotator calls unknown (target <= 5 %)."""
    labels = checked_labels(adata, key, 5)
    keep = np.flatnonzero(labels.notna().to_numpy())
    y = labels.iloc[keep].astype(str).to_numpy()
    rows = []
    for seed in seeds:
        tr, te = train_test_split(keep, test_size=0.2, stratify=y, random_state=seed)
        ref, query = adata[np.sort(tr)].copy(), adata[np.sort(te)].copy()
        cfg = replace(BASE, seed=seed, max_epochs=max_epochs, head=head)
        ann = CellTypeAnnotator(model, cfg).fit(ref, key)
        ann.predict(query)
        uns = query.uns["cellfm_annotation"]
        closed = query.obs["cellfm_label_closed_set"].astype(str).to_numpy()
        row = {"seed": seed, "head": ann.settings["head"], "unknown share": uns["rejected_fraction"],
               "reference (validation) rejected": uns["reference_rejected_fraction"],
               "low confidence": uns["rejected_low_confidence"] / query.n_obs,
               "far from reference": uns["rejected_far_from_reference"] / query.n_obs,
               "macro-F1 closed set": f1(query.obs[key].astype(str).to_numpy(), closed)}
        rows.append(row)
        log("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return rows


def cross_dataset(model, seeds: list[int], head: str, max_epochs: int | None, data_dir) -> pd.DataFrame:
    """pbmc3k (all cells) -> pbmc4k and pbmc68k on the five coarse types, as the report's rows."""
    ontology = read_ontology(resolve_data_dir(data_dir))
    reference = load_benchmark("pbmc3k", data_dir)
    queries = {ds: (load_benchmark(ds, data_dir), BENCHMARKS[ds].label_key) for ds in ("pbmc4k", "pbmc68k")}
    rows = []
    for seed in seeds:
        cfg = replace(BASE, seed=seed, head=head, max_epochs=max_epochs)
        res = annotate_across(reference, BENCHMARKS["pbmc3k"].label_key, queries, model, ontology, cfg)
        for ds, r in res.items():
            for rec in r.table.to_dict("records"):
                rows.append({"query": ds, "seed": seed, "head": r.head, "unknown share": r.unknown_share,
                             "n_query": r.n_query, **rec})
            print(f"  seed {seed} pbmc3k -> {ds}: unknown {r.unknown_share:.3f}, by predicted class "
                  f"{r.unknown_by_class}\n" + r.table.round(3).to_string(), flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    labelled = [k for k, v in BENCHMARKS.items() if v.label_key]
    ap.add_argument("--data", nargs="+", default=["pbmc68k", "pbmc3k"], choices=labelled)
    ap.add_argument("--models", nargs="+", default=["cellfm-mini", "preset:small"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-cells", type=int, default=None, help="stratified subsample (CPU time)")
    ap.add_argument("--max-epochs", type=int, default=None, help="cap on the official head's epochs")
    ap.add_argument("--csv", default=None, help="write every run (one row per seed and setting) here")
    ap.add_argument("--unknown-share", action="store_true",
                    help="instead: fit / predict end to end and report the held-out unknown share")
    ap.add_argument("--head", default="auto", help="the annotator's head with --unknown-share / --cross")
    ap.add_argument("--cross", action="store_true",
                    help="instead: pbmc3k -> pbmc4k / pbmc68k on shared coarse types (the report's rows)")
    args = ap.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s", level=logging.WARNING)
    logging.getLogger("cellfm.tasks.annotation").setLevel(logging.INFO)  # every epoch, and why it stopped
    torch.set_num_threads(args.threads)
    for name in list(SETTINGS):
        if name not in args.settings:
            del SETTINGS[name]
    if args.cross:
        for m in args.models:
            df = cross_dataset(load_model(m), args.seeds, args.head, args.max_epochs, None)
            print(f"\n{m}: macro-F1 / accuracy on the query (mean +- sd over seeds)")
            print(df.groupby(["query", "method"])[["macro_f1", "accuracy", "unknown share"]].agg(
                ["mean", "std"]).round(3).to_string())
        return
    if args.unknown_share:
        out = []
        for data in args.data:
            for m in args.models:
                print(f"{data} / {m}: unknown share of held-out cells", flush=True)
                out += [{"data": data, "model": m, **r} for r in unknown_share(
                    load_benchmark(data), BENCHMARKS[data].label_key, load_model(m), args.seeds,
                    lambda s: print(s, flush=True), args.max_epochs, args.head)]
        df = pd.DataFrame(out)
        print(df.groupby(["data", "model"])[[c for c in df.columns if df[c].dtype == float]].agg(
            ["mean", "std", "max"]).round(3).T.to_string())
        return
    results = []
    for data in args.data:
        adata = load_benchmark(data)
        for m in args.models:
            print(f"{data} / {m}", flush=True)
            for r in run(adata, BENCHMARKS[data].label_key, load_model(m), args.seeds,
                         lambda s: print(s, flush=True), args.max_cells, args.max_epochs):
                results.append({"data": data, "model": m, **r})

    df = pd.DataFrame(results)
    if args.csv:
        df.to_csv(args.csv, index=False)
    mean = df.groupby(["data", "model", "setting"], sort=False)[COLS].agg(["mean", "std"])
    print("\nmacro-F1 on the held-out 20 % (mean +- sd over seeds " + ", ".join(map(str, args.seeds)) + ")")
    table = pd.DataFrame({c: mean[(c, "mean")].map("{:.3f}".format) + " +- " + mean[(c, "std")].map(
        "{:.3f}".format) for c in COLS})
    print(table.to_string())
    print("\nauto kept:", df.groupby(["data", "model", "setting"], sort=False)["auto kept"].agg(
        lambda s: dict(s.value_counts())).to_string())


if __name__ == "__main__":
    main()
