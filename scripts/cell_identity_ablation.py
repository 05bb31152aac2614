"""Controlled pretraining runs that ask why the CLS embedding does (not) learn cell identity.

    python scripts/cell_identity_ablation.py corpus OUT          # the ablation corpus (pbmc3k left out)
    python scripts/cell_identity_ablation.py run OUT NAME [NAME ...]   # train variants (resumable)
    python scripts/cell_identity_ablation.py table OUT [--md docs/cell-identity.md]

Every variant starts from scratch on the same corpus (pbmc4k, celltypist sample, pbmc68k: every
usable human cell of shared/data except pbmc3k, >= 100 expressed genes, larger cells sampled rather
than dropped) and logs the cell-identity probe (kNN / linear-probe accuracy of the CLS, 5-fold CV) on
pbmc3k (never in the corpus), pbmc4k and pbmc68k (in the corpus, labels never used) at step 0 and
every `eval_every` steps. To fit a CPU, runs are short and cells are sampled to 512 genes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CORPUS_FILES = ["pbmc4k_soupx/pbmc4k_soupx_half.h5ad", "celltypist_sample/celltypist_sample_559cells.h5ad",
                "pbmc68k_reduced_scanpy/pbmc68k_reduced_counts.h5ad"]
PROBES = {"pbmc3k_clustifyr/pbmc3k_clustifyr_2000hvg.h5ad": "classified",
          "pbmc4k_soupx/pbmc4k_soupx_half.h5ad": "cell_type",
          "pbmc68k_reduced_scanpy/pbmc68k_reduced_counts.h5ad": "bulk_labels"}

BASE = dict(preset="small", batch_size=16, max_steps=300, lr=1e-3, start_lr=1e-5, min_lr=1e-5,
            warmup_steps=30, val_fraction=0.1, eval_every=100, eval_batches=4, ckpt_every=100,
            log_every=20, seed=0, threads=1, progress=False, probe_max_cells=400)
BASE_MODEL = {"max_genes": 512}

# name -> (what it tests, TrainConfig overrides, ModelConfig overrides). The A runs used the loader
# before shard mixing existed (one source file per batch, as mix_shards=1 now does).
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "A0_official": ("official objective (gene-wise + cell-wise MSE, mask 0.2), batches from one file",
                    {"mix_shards": 1}, {}),
    "A3_offset": ("A0 + cell-wise decoder adds the visible mean (library level off the CLS)",
                  {"mix_shards": 1}, {"cellwise_offset": True}),
    "B0_mixed": ("official objective, batches mix all files (mix_shards=16)", {"mix_shards": 16}, {}),
    "B1_mixed_offset": ("B0 + cell-wise offset", {"mix_shards": 16}, {"cellwise_offset": True}),
    "C0_mixed_unexpressed": ("B0 + unexpressed-gene targets (1 per loss position)",
                             {"mix_shards": 16, "unexpressed_ratio": 1.0}, {}),
}


def build(out: Path) -> None:
    from cellfm.corpus import build_corpus

    build_corpus([DATA / f for f in CORPUS_FILES], out / "corpus", min_genes=100, max_genes=None, workers=1)


def run(out: Path, names: list[str]) -> None:
    from cellfm.training import TrainConfig, pretrain

    for name in names:
        _, train, model = VARIANTS[name]
        cfg = TrainConfig(corpus_dir=str(out / "corpus"), out_dir=str(out / name), **{**BASE, **train},
                          model={**BASE_MODEL, **model}, probe_files=[str(DATA / f) for f in PROBES],
                          probe_label_key=list(PROBES.values()))
        pretrain(cfg)


def table(out: Path) -> str:
    rows = ["| run | what | step | pbmc3k kNN | pbmc3k linear | pbmc4k kNN | pbmc4k linear | pbmc68k kNN | "
            "pbmc68k linear | held-out gene MSE | cell MSE |", "|" + "---|" * 11]
    for name, (what, _, _) in VARIANTS.items():
        log_file = out / name / "log.jsonl"
        if not log_file.is_file():
            continue
        log = [json.loads(line) for line in log_file.read_text().splitlines()]
        mse = {r["step"]: r for r in log if "val_gene_mse" in r}
        for r in (r for r in log if "probe/mean_knn_acc" in r):
            acc = [r[f"probe/{Path(f).stem}/{m}"] for f in PROBES for m in ("knn_acc", "linear_acc")]
            e = mse.get(r["step"], {})
            err = [f"{e['val_gene_mse']:.3f}", f"{e['val_cell_mse']:.3f}"] if e else ["", ""]
            rows.append(f"| {name} | {what if r['step'] == 0 else ''} | {r['step']} | "
                        + " | ".join(f"{a:.3f}" for a in acc) + " | " + " | ".join(err) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["corpus", "run", "table"])
    p.add_argument("out", type=Path)
    p.add_argument("names", nargs="*")
    args = p.parse_args()
    if args.what == "corpus":
        build(args.out)
    elif args.what == "run":
        run(args.out, args.names or list(VARIANTS))
    else:
        sys.stdout.write(table(args.out) + "\n")


if __name__ == "__main__":
    main()
