"""`cellfm integrate`, `gene-function`, `gene-network`, `evaluate`: the analysis commands over
`cellfm.tasks` and the evaluation report (`cellfm.evaluation`). Each parses its flags, calls the
API under `run_cli` (one `error:` line, exit 2 / 1) and prints; `--model` is required and the
model used is printed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellfm.cli.common import (
    DataDirOpt,
    DeviceOpt,
    ModelOpt,
    ThreadsOpt,
    load_model,
    print_table,
    set_threads,
    write_tsv,
)
from cellfm.cli.console import fail, run_cli
from cellfm.evaluation.data import load_benchmark
from cellfm.evaluation.pbmc_batches import build_pbmc_batches
from cellfm.evaluation.plots import embedding_maps
from cellfm.evaluation.report import run_evaluation
from cellfm.evaluation.results import TASKS, EvaluationConfig
from cellfm.io.read import read_cells
from cellfm.io.write import write_text
from cellfm.tasks.gene_function import PAPER_BINARY_TASKS, evaluate_binary_tasks, evaluate_go_terms
from cellfm.tasks.gene_network import evaluate_gene_network
from cellfm.tasks.integration import IntegrationConfig, evaluate_integration
from cellfm.tasks.integration_metrics import AGGREGATES


def integrate(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (scores TSV, maps PNG).")],
    model: ModelOpt,
    input: Annotated[
        Path | None,
        typer.Option("--input", metavar="FILE", help="Your cells (.h5ad, 10x, loom) with raw counts; "
                     "default: the PBMC benchmark (three data sets as batches)."),
    ] = None,
    batch_key: Annotated[str | None, typer.Option(metavar="COLUMN", help="obs column of the batches "
                                                   "(required with --input).")] = None,
    label_key: Annotated[str | None, typer.Option(
        metavar="COLUMN", help="obs column of the cell types, for the bio-conservation scores (required "
        "with --input; unlabelled cells are embedded but not scored).")] = None,
    layer: Annotated[str | None, typer.Option(metavar="NAME", help="Read counts from this layer.")] = None,
    gene_key: Annotated[str | None, typer.Option(metavar="COLUMN", help="var column of gene names.")] = None,
    use_raw: Annotated[bool, typer.Option("--use-raw", help="Read counts (and genes) from .raw.")] = False,
    allow_non_integer: Annotated[bool, typer.Option(
        "--allow-non-integer", help="Accept ambient-corrected counts that are not whole numbers.")] = False,
    data_dir: DataDirOpt = None,
    max_cells_per_batch: Annotated[int | None, typer.Option(help="Subsample each benchmark batch.")] = None,
    finetune_epochs: Annotated[
        int,
        typer.Option(help="Also score after this many epochs of self-supervised integration fine-tuning."),
    ] = 0,
    st_tokens: Annotated[
        bool, typer.Option(help="Fine-tune the authors' ST-token model (library-size tokens after CLS), as "
                           "their integration tutorial does; --no-st-tokens: CLS only.")
    ] = True,
    harmony: Annotated[bool, typer.Option(help="Run Harmony on the PCA when harmonypy is installed.")] = True,
    scvi_epochs: Annotated[
        int, typer.Option(help="scVI training epochs when scvi-tools is installed (0: skip scVI).")
    ] = 20,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Batch integration scores of CellFM next to HVG+PCA, Harmony and scVI.

    On your cells (--input FILE --batch-key K --label-key L) or on the PBMC benchmark (PBMC 4k +
    pbmc3k + celltypist sample; batch = data set). Scores come from scib-metrics when installed
    (pip install 'cellfm[eval]'), else from an approximate stand-in, and the output says which.
    """
    set_threads(threads)
    with run_cli():
        cfg = IntegrationConfig(finetune_epochs=finetune_epochs, st_tokens=st_tokens, harmony=harmony,
                                scvi_epochs=scvi_epochs)
        if input is None:
            adata = build_pbmc_batches(data_dir, max_cells_per_batch=max_cells_per_batch)
            batch_key, label_key = "batch", "coarse_type"
        else:
            if batch_key is None or label_key is None:
                fail("--input needs --batch-key COLUMN and --label-key COLUMN", 2)
            adata = read_cells(input)
        cfm = load_model(model)
        r = evaluate_integration(adata, cfm, batch_key=batch_key, label_key=label_key, layer=layer,
                                 use_raw=use_raw, gene_key=gene_key, allow_non_integer=allow_non_integer,
                                 config=cfg, device=device)
        output.mkdir(parents=True, exist_ok=True)
        write_tsv(r.table, output / "integration_scores.tsv")
        write_text(output / "integration_methods.txt", r.describe() + "\n")
        embedding_maps(r.embeddings, r.obs, [label_key, batch_key], output / "integration_maps.png")
    print_table(r.table[["method", *AGGREGATES]], f"batch integration ({r.scorer})")
    typer.echo(r.describe() + f"\nevery metric: {output / 'integration_scores.tsv'}")


def gene_function(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (TSV tables).")],
    model: ModelOpt,
    data_dir: DataDirOpt = None,
    go: Annotated[bool, typer.Option(help="Also run the multi-label GO term tasks.")] = True,
    all_binary_tasks: Annotated[
        bool, typer.Option(help="All six Geneformer gene tasks instead of the paper's three.")
    ] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Gene function prediction from gene embeddings as the CellFM paper scores it.

    Geneformer's binary gene tasks (5-fold accuracy and AUROC) and GO BP/MF/CC top-10 terms
    (multi-label, AUPR and AUROC).
    """

    set_threads(threads)
    with run_cli():
        ref = load_benchmark("pbmc4k", data_dir)
        cfm = load_model(model)
        chosen = None if all_binary_tasks else list(PAPER_BINARY_TASKS)
        binary = evaluate_binary_tasks(cfm, data_dir=data_dir, reference=ref, tasks=chosen)
        output.mkdir(parents=True, exist_ok=True)
        write_tsv(binary, output / "gene_function_binary.tsv")
        print_table(binary, "binary gene tasks (5-fold CV)")
        if go:
            res = evaluate_go_terms(cfm, data_dir=data_dir, reference=ref)
            write_tsv(res.summary, output / "gene_function_go.tsv")
            write_tsv(res.terms, output / "gene_function_go_terms.tsv")
            print_table(res.summary, "GO top-10 terms, multi-label (5-fold CV)")


def gene_network(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (neighbours + enrichment).")],
    model: ModelOpt,
    data_dir: DataDirOpt = None,
    k: Annotated[int, typer.Option(help="Neighbours per gene.")] = 10,
    threads: ThreadsOpt = None,
) -> None:
    """Top-k gene neighbours by embedding cosine, and their GO BP / Reactome co-membership."""

    set_threads(threads)
    with run_cli():
        ref = load_benchmark("pbmc4k", data_dir)
        cfm = load_model(model)
        r = evaluate_gene_network(cfm, data_dir=data_dir, reference=ref, k=k)
        output.mkdir(parents=True, exist_ok=True)
        write_tsv(r.neighbours, output / f"gene_neighbours_top{k}.tsv")
        write_tsv(r.table, output / "gene_network_enrichment.tsv")
    print_table(r.table, f"top-{k} neighbour co-annotation")


def evaluate(
    output: Annotated[Path, typer.Option("-o", "--output", help="Report folder (report.md + PNGs).")],
    model: ModelOpt,
    data_dir: DataDirOpt = None,
    tasks: Annotated[
        str,
        typer.Option(
            help="Comma-separated subset of: cell_identity, annotation, integration, "
            "perturbation, gene_function, gene_network."
        ),
    ] = "",
    mode: Annotated[str, typer.Option(help="Annotation training mode: frozen, lora or full.")] = "frozen",
    quick: Annotated[bool, typer.Option(help="Subsample cells and genes (minutes on a CPU).")] = False,
    integration_finetune_epochs: Annotated[int, typer.Option(help="Epochs of integration fine-tuning.")] = 1,
    threads: ThreadsOpt = None,
) -> None:
    """Run every downstream task on the real data and write a Markdown report."""
    set_threads(threads)
    with run_cli():
        chosen = tuple(t.strip() for t in tasks.split(",") if t.strip()) or TASKS
        cfg = EvaluationConfig(tasks=chosen, annotation_mode=mode, quick=quick,
                               integration_finetune_epochs=integration_finetune_epochs)
        cfm = load_model(model)
        report = run_evaluation(cfm, output, data_dir=data_dir, config=cfg, model_name=model)
    for title, err in report.failed.items():
        typer.echo(f"warning: {title} failed: {err}", err=True)
    typer.echo(f"report written to {report.path}")
