"""The sections of the evaluation report: one function per task, each taking the run's
`RunContext`, running the task and returning a `SectionResult` (Markdown text, what results.json
keeps, the summary's headlines) with its figures written beside the report. `report.py` assembles
them; this module holds no report layout beyond each section's own text.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellfm.evaluation.cell_identity import evaluate_cell_identity, identity_markdown, identity_targets
from cellfm.evaluation.data import BENCHMARKS, load_benchmark
from cellfm.evaluation.markdown import figure_link, markdown_table
from cellfm.evaluation.pbmc_batches import build_pbmc_batches
from cellfm.evaluation.plots import confusion_matrix_plot, embedding_maps, grouped_bars
from cellfm.evaluation.results import Headline, RunContext, SectionResult
from cellfm.tasks.annotation import AnnotatorConfig, evaluate_annotation
from cellfm.tasks.annotation.cross_dataset import annotate_across, read_ontology
from cellfm.tasks.gene_function import PAPER_BINARY_TASKS, evaluate_binary_tasks, evaluate_go_terms
from cellfm.tasks.gene_network import evaluate_gene_network
from cellfm.tasks.integration import IntegrationConfig, evaluate_integration
from cellfm.tasks.integration_metrics import AGGREGATES
from cellfm.tasks.perturbation import evaluate_perturbation
from cellfm.tasks.perturbation_benchmark import evaluate_perturbation_gears, perturbation_markdown
from cellfm.tasks.perturbation_gears import GearsConfig, require_gears

ANNOTATION_SETS = ("pbmc3k", "pbmc4k", "pbmc68k")
CROSS_REFERENCE, CROSS_QUERIES = "pbmc3k", ("pbmc4k", "pbmc68k")  # fit on one, label the others


def _subsample(adata, n: int, seed: int):
    if adata.n_obs <= n:
        return adata
    return adata[np.sort(np.random.default_rng(seed).choice(adata.n_obs, n, replace=False))].copy()


def _cross_dataset_rows(data_dir, model, config: AnnotatorConfig, quick: bool, seed: int):
    """(table rows, text lines) of the annotator fitted on all of pbmc3k labelling the other data
    sets, scored on the coarse types both share (Cell Ontology roll-up)."""
    ontology = read_ontology(data_dir)
    load = {ds: load_benchmark(ds, data_dir) for ds in (CROSS_REFERENCE, *CROSS_QUERIES)}
    load = {ds: _subsample(a, 1000, seed) if quick else a for ds, a in load.items()}
    queries = {ds: (load[ds], BENCHMARKS[ds].label_key) for ds in CROSS_QUERIES}
    results = annotate_across(load[CROSS_REFERENCE], BENCHMARKS[CROSS_REFERENCE].label_key, queries, model,
                              ontology, config)
    rows, text = [], []
    for ds, r in results.items():
        name = f"{CROSS_REFERENCE} → {ds} (coarse)"
        rows.append(r.table.assign(dataset=name))
        worst = max(r.unknown_by_class.items(), key=lambda kv: kv[1], default=("", 0.0))
        text.append(f"- **{name}**: fitted on {r.n_reference} {CROSS_REFERENCE} cells, {r.n_query} query "
                    f"cells of the shared coarse types; CellFM head {r.head}; unknown {r.unknown_share:.1%} "
                    f"of the query (most among cells predicted {worst[0]}: {worst[1]:.1%}).")
    return rows, text


def cell_identity_section(ctx: RunContext) -> SectionResult:
    model, data_dir, quick, seed = ctx.model, ctx.data_dir, ctx.config.quick, ctx.config.seed
    table = evaluate_cell_identity(model, data_dir, seeds=(seed,) if quick else (seed, seed + 1, seed + 2),
                                   max_cells=600 if quick else 1500)
    text = (
        "Before any head is trained: 5-fold cross-validated 15-NN accuracy (Euclidean on the raw "
        "embedding, as `sc.pp.neighbors(use_rep=...)` sees it) and logistic-regression accuracy of the "
        "frozen CLS embedding, next to an untrained model of the same shape (what pretraining added) "
        "and PCA of HVG log counts (2,000 HVGs, scaled, 50 PCs; scanpy when installed); mean "
        "+- sd over CV seeds.\n\n" + identity_markdown(table) + "\n\nTargets: "
        + "; ".join(identity_targets(table)) + "."
    )
    headline = Headline("cell identity (frozen CLS)", "15-NN accuracy, mean over data sets", table,
                        "embedding", "knn_acc")
    return SectionResult(text, {"table": table}, [headline])


def annotation_section(ctx: RunContext) -> SectionResult:
    model, data_dir, out, cfg = ctx.model, ctx.data_dir, ctx.out, ctx.config
    mode, quick, seed, progress = cfg.annotation_mode, cfg.quick, cfg.seed, cfg.progress
    rows, res, text, n_types = [], {}, [], {}
    for ds in ANNOTATION_SETS:
        adata = load_benchmark(ds, data_dir)
        if quick and adata.n_obs > 1000:
            adata = adata[
                np.sort(np.random.default_rng(seed).choice(adata.n_obs, 1000, replace=False))
            ].copy()
        r = evaluate_annotation(adata, BENCHMARKS[ds].label_key, model,
                                AnnotatorConfig(mode=mode, seed=seed, progress=progress), seed=seed)
        t = r.table.assign(dataset=ds)
        n_types[ds] = len(set(r.y_true))
        rows.append(t)
        res[ds] = {"table": r.table, "head": r.head, "head_selection": r.head_selection,
                   "rejected_fraction": r.rejected_fraction, "stops": r.stops}
        text.append(
            f"- **{ds}** ({BENCHMARKS[ds].description}): {r.n_train} train / {r.n_test} test "
            f"cells; CellFM head {r.head}, open-set rejection {r.rejected_fraction:.1%} of test cells, "
            f"accuracy on the accepted ones {r.score(t['method'].iloc[0], 'accuracy_accepted'):.3f}; "
            f"temperature {r.temperature:.2f}."
        )
        if ds == "pbmc3k":
            cm = confusion_matrix_plot(
                r.y_true,
                next(iter(r.predictions.values())),
                out / "confusion_pbmc3k.png",
                f"CellFM ({mode}) on pbmc3k held-out cells",
            )
    cross_config = AnnotatorConfig(mode=mode, seed=seed, progress=progress)
    cross_rows, cross_text = _cross_dataset_rows(data_dir, model, cross_config, quick, seed)
    n_types |= {t["dataset"].iloc[0]: 5 for t in cross_rows}
    res["cross_dataset"] = pd.concat(cross_rows)
    table = pd.concat(rows + cross_rows)[["dataset", "method", "accuracy", "macro_f1"]]
    bars = grouped_bars(
        table,
        "dataset",
        "method",
        "macro_f1",
        out / "annotation_bars.png",
        "Cell type annotation on held-out cells (20 % of each data set)",
        (0, 1),
        ylabel="macro-F1 (0 to 1)",
        chance={ds: 1 / k for ds, k in n_types.items()},
        chance_label="chance (1 / number of types)",
        best=1.0,
    )
    text = (
        "Stratified 80/20 split per data set (seed fixed); CellFM annotator trained on the 80 % "
        f"(mode `{mode}`, 20 % of it held out for head choice / early stopping / temperature); baselines: "
        "logistic regression on HVG+PCA (50 PCs of 2,000 HVGs, z-scored) and logistic regression on "
        "the model's CLS, both fitted on the training cells only. Closed-set accuracy (every "
        "cell gets its most likely type) so that all methods are compared alike.\n\n"
        + markdown_table(table)
        + "\n\n"
        + "\n".join(text)
        + "\n\nCross-data-set rows (`pbmc3k → ...`): the annotator and both baselines fitted on all "
        "pbmc3k cells, scored on the other data set's cells. Labels are mapped to five coarse types "
        "(B, CD4 T, CD8 T, NK cell, mononuclear phagocyte) by a hand-made label → Cell Ontology term "
        "table and the ontology's ancestors (`cellfm.tasks.annotation.cross_dataset`); platelets and "
        "CD34+ cells have no coarse type and are left out. The PCA baseline uses the genes both data "
        "sets measure (of pbmc3k's 2,000 HVGs: 1,957 with pbmc4k, 268 with pbmc68k). A different "
        "protocol or panel can raise the unknown share: "
        "see docs/annotation.md.\n\n"
        + "\n".join(cross_text)
        + "\n\n"
        + figure_link(bars, "annotation bars")
        + "\n\n"
        + figure_link(cm, "confusion matrix")
    )
    headline = Headline("annotation", "macro-F1, mean over data sets", table, "method", "macro_f1")
    return SectionResult(text, {"table": table, **res}, [headline])


def integration_section(ctx: RunContext) -> SectionResult:
    model, data_dir, out, cfg = ctx.model, ctx.data_dir, ctx.out, ctx.config
    quick, seed, progress = cfg.quick, cfg.seed, cfg.progress
    finetune_epochs = cfg.integration_finetune_epochs
    adata = build_pbmc_batches(data_dir, max_cells_per_batch=600 if quick else None, seed=seed)
    cfg = IntegrationConfig(finetune_epochs=finetune_epochs, scvi_epochs=10 if quick else 20, seed=seed)
    r = evaluate_integration(adata, model, config=cfg, progress=progress)
    table = r.table
    maps = embedding_maps(r.embeddings, adata.obs, ["coarse_type", "batch"], out / "integration_maps.png",
                          seed)
    long = table.melt(id_vars="method", value_vars=AGGREGATES, var_name="score")
    bars = grouped_bars(long, "score", "method", "value", out / "integration_bars.png",
                        "Batch integration (scIB aggregates)", (0, 1), ylabel="score (0 to 1)", best=1.0)
    counts = adata.obs.groupby("batch", observed=True).size().to_dict()
    approximate = not r.scorer.startswith("scib-metrics")
    scorer = (
        f"**Scores: {r.scorer}** (a scikit-learn stand-in: not comparable with published "
        "scib-metrics numbers; `pip install 'cellfm[eval]'` for the real ones)"
        if approximate
        else f"Scores: {r.scorer}, default bio-conservation and batch-correction metrics, "
        "unscaled; Total = 0.4 batch correction + 0.6 bio conservation"
    )
    ran = "\n".join(f"- **{m}**: {note}" for m, note in r.methods.items())
    text = (
        f"Batches = data sets {counts} on their {adata.n_vars} common genes; labels harmonised to coarse "
        "types (`COARSE_TYPES` in evaluation/pbmc_batches.py). Every method embeds all cells; the "
        f"scores use the {r.n_scored} labelled ones (the celltypist sample has no labels). The batches "
        "differ in biology too (different donors / label sets), so perfect mixing is not the goal: read "
        "batch and bio scores together. "
        + (
            f"CellFM zero-shot, and after {finetune_epochs} epoch(s) of the official integration "
            "fine-tuning recipe (masked value reconstruction on half of each cell's genes + elastic "
            "cell similarity, all parameters, Adam 1e-4; self-supervised: labels and batches unused; "
            "the tutorial runs 30 epochs on a GPU)."
            if finetune_epochs > 0
            else "CellFM zero-shot only (no integration fine-tuning asked for)."
        )
        + f"\n\n{scorer}.\n\nMethods:\n{ran}\n\n"
        + markdown_table(table)
        + "\n\n"
        + figure_link(bars, "integration bars")
        + "\n\n"
        + figure_link(maps, "embedding maps")
    )
    metric = "Total (approximate, no scib-metrics)" if approximate else "scib-metrics Total"
    headline = Headline("integration", metric, table, "method", "Total")
    return SectionResult(text, {"table": table, "scorer": r.scorer, "methods": r.methods}, [headline])


def perturbation_section(ctx: RunContext) -> SectionResult:
    """GEARS, GEARS + CellFM and the simple baselines when GEARS is installed, else the fast
    gene-embedding predictors (and the text says which ran)."""
    model, data_dir, out, cfg = ctx.model, ctx.data_dir, ctx.out, ctx.config
    quick, seed, progress = cfg.quick, cfg.seed, cfg.progress

    adata = load_benchmark("papalexi", data_dir)
    try:
        require_gears()
    except ImportError as err:
        res = _perturbation_embedding_section(ctx, adata)
        res.text = f"GEARS did not run ({err}).\n\n" + res.text
        return res

    cells = 40 if quick else 200  # GEARS on a CPU: minutes per split at 200 cells per condition
    cfg = GearsConfig(epochs=2 if quick else GearsConfig.epochs, max_cells_per_condition=cells)
    seeds = (seed + 1,) if quick else (seed + 1, seed + 2, seed + 3)
    go_dir = data_dir / "go_annotations_org_hs_eg_db"
    r = evaluate_perturbation_gears(adata, model, go_dir, seeds=seeds, config=cfg,
                                    log=print if progress else (lambda *_: None))
    table = r["table"]
    long = table.melt(id_vars="method", value_vars=["pearson_delta", "pearson_delta_de"], var_name="metric")
    long["metric"] = long.metric.map({"pearson_delta": "all genes", "pearson_delta_de": "top-20 DE genes"})
    bars = grouped_bars(
        long, "metric", "method", "value", out / "perturbation_bars.png",
        "Unseen knock-outs: predicted vs true expression change (Δ)",
        ylabel="Pearson r of Δ (mean over knock-outs and splits)", chance=0.0,
        chance_label="no correlation (0)", best=1.0,
    )
    n_test = r["per_perturbation"].groupby("seed").perturbation.nunique()
    text = (
        "Papalexi 2021 ECCITE-seq (THP-1, 299-gene panel). GEARS (cell-gears 0.1.2, run offline with "
        "a GO graph built from org.Hs.eg.db) on its simulation split: a seeded 75 % of the knocked-out "
        f"genes train, the rest are unseen ({', '.join(str(v) for v in n_test)} test knock-outs in "
        f"splits {', '.join(str(s) for s in r['seeds'])}). {cfg.max_cells_per_condition or 'all'} cells "
        f"per condition, {cfg.epochs} epochs, hidden size {cfg.hidden_size}. GEARS + CellFM replaces "
        "GEARS' gene embeddings with CellFM's output tokens of each gene in the paired control cell "
        "(the authors' way). The baselines (Ahlmann-Eltze et al. 2025) fit on the training and "
        "validation knock-outs. Profile = mean log-normalised expression of a knock-out's cells; "
        "Δ = profile - control mean; DE genes = GEARS' top 20 (rank_genes_groups vs control). "
        "Mean ± sd over splits.\n\n"
        + perturbation_markdown(table)
        + "\n\n"
        + figure_link(bars, "perturbation bars")
    )
    headline = Headline("perturbation (unseen knock-outs)", "Pearson of Δ, top-20 DE genes", table,
                        "method", "pearson_delta_de", lambda name: "CellFM" in name)
    record = {"table": table, "per_perturbation": r["per_perturbation"], "method": "gears"}
    return SectionResult(text, record, [headline])


def _perturbation_embedding_section(ctx: RunContext, adata) -> SectionResult:
    model, out, reference, seed = ctx.model, ctx.out, ctx.reference(), ctx.config.seed
    r = evaluate_perturbation(adata, model, reference=reference, seed=seed)
    table = r["table"]
    long = table.melt(id_vars="method", value_vars=["pearson_all", "pearson_top_de"], var_name="metric")
    bars = grouped_bars(
        long,
        "metric",
        "method",
        "value",
        out / "perturbation_bars.png",
        "Held-out knock-outs: predicted vs true expression change",
        ylabel="Pearson r (mean over knock-outs)",
        chance=0.0,
        chance_label="no correlation (0)",
        best=1.0,
    )
    text = (
        f"Papalexi 2021 ECCITE-seq (THP-1, 299-gene panel): effect = mean log-normalised expression of "
        f"each of the {len(r['effects'])} knock-outs minus non-targeting controls (size factor = the "
        "full-transcriptome UMI count). 5-fold split over perturbations (each knock-out is predicted by "
        "a model that never saw it). Pearson over all 299 genes and over the 20 genes with the largest "
        f"|true effect| of each held-out knock-out, averaged. {r['n_missing_in_vocab']} targets are "
        "missing from the vocabulary (they get the mean embedding). Expression stats are of the target "
        "gene in PBMC 4k cells (most targets are not in the 299-gene panel).\n\n"
        + markdown_table(table)
        + "\n\n"
        + figure_link(bars, "perturbation bars")
    )
    headline = Headline("perturbation", "Pearson, top-20 DE genes", table, "method", "pearson_top_de")
    record = {"table": table, "per_perturbation": r["per_perturbation"], "method": "embedding"}
    return SectionResult(text, record, [headline])


def gene_function_section(ctx: RunContext) -> SectionResult:
    model, data_dir, out, reference = ctx.model, ctx.data_dir, ctx.out, ctx.reference()
    quick, seed, progress = ctx.config.quick, ctx.config.seed, ctx.config.progress
    binary = evaluate_binary_tasks(model, data_dir=data_dir, reference=reference,
                                   tasks=list(PAPER_BINARY_TASKS), seed=seed, progress=progress)
    go = evaluate_go_terms(model, data_dir=data_dir, reference=reference, seed=seed, progress=progress,
                           max_genes=1500 if quick else 3000)
    go_sum = go.summary
    both = pd.concat([
        binary.assign(panel=binary["task"] + " (AUROC)")[["panel", "method", "auroc"]],
        go_sum.assign(panel="GO " + go_sum["ontology"] + " (AUPR)")[["panel", "method", "aupr"]]
        .rename(columns={"aupr": "auroc"}),
    ])
    bars = grouped_bars(both, "panel", "method", "auroc", out / "gene_function_bars.png",
                        "Gene function, 5-fold CV: binary tasks AUROC, GO top-10 AUPR", (0, 1),
                        ylabel="AUROC (binary) / AUPR (GO)", best=1.0)
    text = (
        "Linear probe (logistic regression, balanced, C=0.1, standardised features), 5-fold CV; the "
        "CellFM tutorials train a small MLP instead. Features: the CellFM gene table row, expression "
        "statistics in PBMC 4k cells (log mean, log variance, detection rate, measured flag) and random "
        "vectors of the same width. Binary tasks: the paper's three Geneformer tasks, labels mapped "
        "through the vocabulary (Ensembl id, then symbol); accuracy and AUROC. GO: per ontology the 10 "
        "most frequent terms among vocabulary genes (direct org.Hs.eg.db annotations, roots excluded), "
        "genes with at least one of them (subsampled), multi-label; AUPR and Fmax over all (gene, term) "
        "pairs as the CellFM tutorial computes them (label_density = AUPR of a random scorer), AUROC "
        "averaged over terms. Per-term scores in results.json."
        "\n\n### Binary tasks\n\n"
        + markdown_table(binary)
        + "\n\n### GO terms, top 10 per ontology (multi-label)\n\n"
        + markdown_table(go_sum)
        + "\n\n"
        + figure_link(bars, "gene function bars")
    )
    headlines = [Headline("gene function (binary)", "AUROC, mean over tasks", binary, "method", "auroc"),
                 Headline("gene function (GO)", "AUPR, mean over BP/MF/CC", go_sum, "method", "aupr")]
    return SectionResult(text, {"binary": binary, "go": go_sum, "go_terms": go.terms}, headlines)


def gene_network_section(ctx: RunContext) -> SectionResult:
    model, data_dir, out, reference = ctx.model, ctx.data_dir, ctx.out, ctx.reference()
    seed, progress = ctx.config.seed, ctx.config.progress
    r = evaluate_gene_network(model, data_dir=data_dir, reference=reference, seed=seed, progress=progress)
    table = r.table
    r.neighbours.to_csv(out / "gene_neighbours_top10.tsv", sep="\t", index=False)
    bars = grouped_bars(
        table,
        "annotation",
        "method",
        "fold_enrichment",
        out / "gene_network_bars.png",
        "Top-10 neighbour pairs sharing an annotation",
        ylabel="fold enrichment over random pairs (x)",
        chance=1.0,
        chance_label="random pairs (1x)",
    )
    text = (
        f"{r.n_genes} genes (vocabulary genes with a GO BP annotation, detected in >= 5 % of PBMC 4k "
        "cells). For each gene its 10 nearest genes by cosine similarity; share = fraction of those pairs "
        "with a common GO BP term (terms of 5-500 genes, propagated) or Reactome pathway (5-500 genes); "
        "random = the same for 50,000 random pairs of the same genes; p_permutation from 50 shuffles of "
        "the annotations among genes. No TF-target pair source is in the shared data, so that check is "
        "not run. Neighbour list of CellFM: `gene_neighbours_top10.tsv`.\n\n"
        + markdown_table(table)
        + "\n\n"
        + figure_link(bars, "gene network bars")
    )
    headline = Headline("gene network (GO BP)", "fold enrichment", table[table["annotation"] == "GO BP"],
                        "method", "fold_enrichment")
    return SectionResult(text, {"table": table}, [headline])
