"""`cellfm integrate`, `gene-function`, `gene-network`, `evaluate`: the analysis commands over
`cellfm.tasks` and the evaluation report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellfm.cli.common import (
    DataDirOpt,
    ModelOpt,
    ThreadsOpt,
    load_model,
    print_table,
    set_threads,
    write_tsv,
)
from cellfm.cli.console import fail
from cellfm.io.write import write_text


def integrate(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (scores TSV, maps PNG).")],
    model: ModelOpt,
    data_dir: DataDirOpt = None,
    max_cells_per_batch: Annotated[int | None, typer.Option(help="Subsample each batch.")] = None,
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
    threads: ThreadsOpt = None,
) -> None:
    """Batch integration benchmark (PBMC 4k + pbmc3k + celltypist sample; batch = data set).

    Scores come from scib-metrics when installed (pip install 'cellfm[eval]'), else from an
    approximate stand-in, and the output says which.
    """
    from cellfm.tasks.integration import build_pbmc_batches, describe_run, evaluate_integration
    from cellfm.tasks.report_plots import embedding_maps

    set_threads(threads)
    if scvi_epochs < 0:
        fail(f"--scvi-epochs must be 0 (skip scVI) or more, not {scvi_epochs}", 2)
    cfm = load_model(model)
    try:
        adata = build_pbmc_batches(data_dir, max_cells_per_batch=max_cells_per_batch)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err), 2)
    r = evaluate_integration(
        adata, cfm, finetune_epochs=finetune_epochs, harmony=harmony, scvi_epochs=scvi_epochs,
        st_tokens=st_tokens
    )
    output.mkdir(parents=True, exist_ok=True)
    write_tsv(r["table"], output / "integration_scores.tsv")
    write_text(output / "integration_methods.txt", describe_run(r) + "\n")
    embedding_maps(r["embeddings"], adata.obs, ["coarse_type", "batch"], output / "integration_maps.png")
    from cellfm.tasks.integration_metrics import AGGREGATES

    print_table(r["table"][["method", *AGGREGATES]], f"batch integration ({r['scorer']})")
    typer.echo(describe_run(r) + f"\nevery metric: {output / 'integration_scores.tsv'}")


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
    from cellfm.tasks.benchmark_data import load_benchmark
    from cellfm.tasks.gene_function import PAPER_BINARY_TASKS, evaluate_binary_tasks, evaluate_go_terms

    set_threads(threads)
    cfm = load_model(model)
    try:
        ref = load_benchmark("pbmc4k", data_dir)
        chosen = None if all_binary_tasks else list(PAPER_BINARY_TASKS)
        binary = evaluate_binary_tasks(cfm, data_dir=data_dir, reference=ref, tasks=chosen)
    except FileNotFoundError as err:
        fail(str(err), 2)
    output.mkdir(parents=True, exist_ok=True)
    write_tsv(binary, output / "gene_function_binary.tsv")
    print_table(binary, "binary gene tasks (5-fold CV)")
    if go:
        res = evaluate_go_terms(cfm, data_dir=data_dir, reference=ref)
        write_tsv(res["summary"], output / "gene_function_go.tsv")
        write_tsv(res["terms"], output / "gene_function_go_terms.tsv")
        print_table(res["summary"], "GO top-10 terms, multi-label (5-fold CV)")


def gene_network(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (neighbours + enrichment).")],
    model: ModelOpt,
    data_dir: DataDirOpt = None,
    k: Annotated[int, typer.Option(help="Neighbours per gene.")] = 10,
    threads: ThreadsOpt = None,
) -> None:
    """Top-k gene neighbours by embedding cosine, and their GO BP / Reactome co-membership."""
    from cellfm.tasks.benchmark_data import load_benchmark
    from cellfm.tasks.gene_network import evaluate_gene_network

    set_threads(threads)
    cfm = load_model(model)
    try:
        ref = load_benchmark("pbmc4k", data_dir)
        r = evaluate_gene_network(cfm, data_dir=data_dir, reference=ref, k=k)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err), 2)
    output.mkdir(parents=True, exist_ok=True)
    r["neighbours"].to_csv(output / f"gene_neighbours_top{k}.tsv", sep="\t", index=False)
    r["table"].to_csv(output / "gene_network_enrichment.tsv", sep="\t", index=False)
    print_table(r["table"], f"top-{k} neighbour co-annotation")


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
    from cellfm.tasks.report import TASKS, run_evaluation

    set_threads(threads)
    chosen = tuple(t.strip() for t in tasks.split(",") if t.strip()) or TASKS
    bad = sorted(set(chosen) - set(TASKS))
    if bad:
        fail(f"unknown tasks {bad}; choose from {', '.join(TASKS)}", 2)
    cfm = load_model(model)
    path = run_evaluation(
        cfm, output, data_dir=data_dir, tasks=chosen, annotation_mode=mode, quick=quick, model_name=model
    )
    typer.echo(f"report written to {path}")
