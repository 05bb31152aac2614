"""Build, train and document the built-in `cellfm-mini` model.

    python scripts/train_cellfm_mini.py [--data ../shared/data]

1. builds the corpus of every human raw-count file listed in shared/data/mini_corpus/MANIFEST.tsv
   (runs/mini_corpus; skipped if it exists);
2. runs configs/cellfm-mini.toml (resumes if interrupted);
3. scores the held-out cells (10 %, never trained on) at the pretraining loss positions: masked
   value MSE of the model's gene-wise and cell-wise decoders against the per-gene-mean baseline;
4. copies the model to src/cellfm/pretrained/cellfm-mini/ with MODEL_CARD.md and scores.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cellfm-mini.toml")
    args = parser.parse_args()

    import cellfm
    from cellfm.corpus import CorpusManifest, build_corpus
    from cellfm.training import TrainConfig, pretrain
    from cellfm.training.evaluate import held_out_dataset, masked_value_mse, per_gene_mean_mse, per_gene_means

    cfg = TrainConfig.from_toml(args.config)
    corpus = Path(cfg.corpus_dir)
    manifest = pd.read_csv(args.data / "mini_corpus" / "MANIFEST.tsv", sep="\t")
    human = manifest.loc[manifest.species == "human", "path"]
    inputs = [(args.data / "mini_corpus" / p).resolve() for p in human]
    if not (corpus / "manifest.json").is_file():
        build_corpus(inputs, corpus, workers=2)
    model_dir = pretrain(cfg)

    mc = cfg.model_config()
    val = held_out_dataset(corpus, batch_size=cfg.batch_size, val_fraction=cfg.val_fraction,
                           max_genes=mc.max_genes, seed=cfg.seed)
    means = per_gene_means(corpus, val_fraction=cfg.val_fraction, n_rows=mc.gene_table_rows)
    base = per_gene_mean_mse(means, val)
    model = cellfm.load(model_dir)
    scores = masked_value_mse(model.module, val)
    log = [json.loads(line) for line in (Path(cfg.out_dir) / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if "loss" in r]
    m = CorpusManifest.load(corpus)
    result = {**scores, **{k: v for k, v in base.items() if k != "val_positions"},
              "steps": cfg.max_steps, "train_cells": int(m.n_cells - val.n_cells), "val_cells": val.n_cells,
              "tokens": train[-1]["tokens"], "train_hours_cpu": train[-1]["elapsed_s"] / 3600}

    dest = REPO / "src" / "cellfm" / "pretrained" / "cellfm-mini"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(model_dir, dest)
    for f in dest.iterdir():
        f.chmod(0o644)
    (dest / "scores.json").write_text(json.dumps(result, indent=2) + "\n")
    (dest / "MODEL_CARD.md").write_text(model_card(cfg, mc, m, result))
    print(json.dumps(result, indent=2))


def model_card(cfg, mc, manifest, r: dict) -> str:
    rows = "\n".join(f"| {Path(x.input).name} | {x.cells_read} | {x.cells_kept} |"
                     for x in manifest.report.itertuples())
    better = (1 - r["val_gene_mse"] / r["baseline_mse"]) * 100
    return f"""# cellfm-mini

A small CellFM (ERetNet) model pretrained from scratch, shipped inside the package so that
`cellfm.load("cellfm-mini")` works offline. It is a demonstration and test model, trained on a
few thousand PBMC-like cells: use the official 80M / 800M weights for real analyses.

## Model
`small` preset: d_model {mc.d_model}, {mc.n_layers} ERetNet layers, {mc.n_heads} heads, value encoder
with {mc.value_bins} bins, vocabulary `{mc.vocabulary}` ({mc.n_genes} genes), at most {mc.max_genes}
expressed genes per cell, pad_zero={mc.pad_zero}. Weights fp32, safetensors.

## Data
Every human raw-count file of `shared/data/mini_corpus/MANIFEST.tsv`, built with
`cellfm corpus build` (official filters: 200 to 2048 expressed vocabulary genes per cell):

| file | cells read | cells kept |
|---|---|---|
{rows}

Dropped cells have fewer than 200 or more than 2048 expressed vocabulary genes (the Papalexi
screen measures 299 genes, so none of its cells reaches 200).

{r["val_cells"]} cells (10 %, a fixed hash of file and cell id) are held out and never trained on;
{r["train_cells"]} cells train.

## Training
`configs/cellfm-mini.toml`: the official objective (masked value recovery: 20 % of expressed genes
in the loss, 80 % of those hidden; gene-wise + cell-wise MSE), Adam (0.9, 0.95), eps 1e-8, L2
decay 1e-5 on matrices, every gradient clipped to norm 1, warmup-cosine schedule
{cfg.start_lr:g} -> {cfg.lr:g} (warmup {cfg.warmup_steps} steps) -> {cfg.min_lr:g}; batch {cfg.batch_size},
{r["steps"]} steps ({r["tokens"]:,} tokens), seed {cfg.seed}, one CPU process
({r["train_hours_cpu"] * 60:.0f} min on 2 cores). Reproduce: `python scripts/train_cellfm_mini.py`.

## Held-out masked-value MSE
At the pretraining loss positions of the held-out cells (log1p of library-scaled counts, as the
model sees them; {r["val_positions"]:,} positions):

| predictor | MSE |
|---|---|
| cellfm-mini, gene-wise decoder | {r["val_gene_mse"]:.4f} |
| cellfm-mini, cell-wise decoder | {r["val_cell_mse"]:.4f} |
| per-gene mean over training cells expressing the gene | {r["baseline_mse"]:.4f} |

The gene-wise decoder's error is {better:.1f} % {"below" if better > 0 else "above"} the per-gene-mean
baseline.

## Licence
Weights: MIT, like the code. The gene vocabulary (`genes.txt`) is the official CellFM list,
CC BY-NC-ND 4.0 (see `cellfm/vocab/data/NOTICE.md`).
"""


if __name__ == "__main__":
    main()
