"""`cellfm perturb`: genetic perturbation prediction, a thin layer over `cellfm.tasks.perturbation*`."""

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
    read_input,
    set_threads,
    write_tsv,
)
from cellfm.cli.console import fail, run_cli
from cellfm.evaluation.data import load_benchmark, resolve_data_dir
from cellfm.io.write import write_text
from cellfm.tasks.perturbation import evaluate_perturbation
from cellfm.tasks.perturbation_benchmark import evaluate_perturbation_gears, perturbation_markdown
from cellfm.tasks.perturbation_gears import GearsConfig, require_gears
from cellfm.tasks.perturbation_reverse import reverse_markdown


def perturb(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (TSV tables).")],
    model: ModelOpt,
    data_dir: DataDirOpt = None,
    input: Annotated[
        Path | None,
        typer.Option("--input", help="Your own screen (.h5ad, raw counts) instead of Papalexi 2021; "
                     "obs[--condition-key] is 'ctrl' or 'GENE+ctrl'."),
    ] = None,
    condition_key: Annotated[str, typer.Option(help="obs column of the condition.")] = "condition",
    control: Annotated[str, typer.Option(help="Condition name of the control cells.")] = "ctrl",
    size_factor_key: Annotated[
        str | None,
        typer.Option(help="obs column with each cell's full-transcriptome count, the size factor of a "
                     "targeted panel (default: Papalexi's response_n_umis without --input, else the "
                     "panel's total)."),
    ] = None,
    method: Annotated[
        str,
        typer.Option(help="gears: GEARS, GEARS + CellFM gene tokens and the linear baselines on GEARS' "
                     "splits (needs the gears extra); embedding: only the fast gene-embedding predictors "
                     "(k-fold); auto: gears when installed."),
    ] = "auto",
    splits: Annotated[int, typer.Option(help="GEARS simulation splits (seeds 1..N).")] = 3,
    epochs: Annotated[int, typer.Option(help="GEARS training epochs.")] = 10,
    max_cells_per_condition: Annotated[
        int, typer.Option(help="Cells kept per knock-out and of the controls (0: all; GEARS on CPU is slow).")
    ] = 200,
    n_folds: Annotated[int, typer.Option(help="Folds of the --method embedding predictors.")] = 5,
    reverse: Annotated[
        bool, typer.Option("--reverse/--no-reverse",
                           help="Reverse perturbation (GEARS path): rank every candidate perturbation "
                                "against each unseen observed profile; top-1/3/10 accuracy per method.")
    ] = True,
    threads: ThreadsOpt = None,
) -> None:
    """Predict unseen knock-out effects (Papalexi 2021 ECCITE-seq): GEARS offline, GEARS + CellFM,
    simple baselines."""
    with run_cli():
        _perturb(output, model, data_dir, input, condition_key, control, size_factor_key, method, splits,
                 epochs, max_cells_per_condition, n_folds, reverse, threads)


def _perturb(output, model, data_dir, input, condition_key, control, size_factor_key, method, splits,
             epochs, max_cells_per_condition, n_folds, reverse, threads) -> None:
    if method not in ("auto", "gears", "embedding"):
        fail(f"--method {method!r} is not one of auto, gears, embedding", 2)
    if splits < 1 or epochs < 1 or max_cells_per_condition < 0:
        fail("--splits and --epochs must be >= 1 and --max-cells-per-condition >= 0", 2)
    if method != "embedding":
        try:
            require_gears()
            method = "gears"
        except ImportError as err:
            if method == "gears":
                fail(f"{err}; or run --method embedding", 2)
            typer.echo(f"note: {err}; running --method embedding")
            method = "embedding"
    set_threads(threads)
    cfm = load_model(model)
    try:
        adata = read_input(input) if input is not None else load_benchmark("papalexi", data_dir)
        if input is None and size_factor_key is None:
            size_factor_key = "response_n_umis"
        ref = load_benchmark("pbmc4k", data_dir) if method == "embedding" else None
        go_dir = resolve_data_dir(data_dir) / "go_annotations_org_hs_eg_db"
    except FileNotFoundError as err:
        fail(str(err), 2)
    cfg = GearsConfig(epochs=epochs, max_cells_per_condition=max_cells_per_condition or None)
    if method == "embedding":  # the input checks run first (run_cli: one error line, CLI words)
        r = evaluate_perturbation(adata, cfm, reference=ref, n_folds=n_folds, condition_key=condition_key,
                                  control=control, size_factor_key=size_factor_key)
    else:
        r = evaluate_perturbation_gears(
            adata, cfm, go_dir, seeds=tuple(range(1, splits + 1)), config=cfg,
            condition_key=condition_key, control=control, size_factor_key=size_factor_key,
            reverse=reverse, celleval_dir=output / "cell_eval", log=typer.echo,
        )
    output.mkdir(parents=True, exist_ok=True)
    if method == "embedding":
        write_tsv(r.table, output / "perturbation_scores.tsv")
        write_tsv(r.per_perturbation, output / "perturbation_per_knockout.tsv")
        print_table(r.table, f"held-out perturbations, {n_folds}-fold (mean over knock-outs)")
        return
    write_tsv(r.table, output / "perturbation_scores.tsv")
    write_tsv(r.per_perturbation, output / "perturbation_per_knockout.tsv")
    md = perturbation_markdown(r.table, r.celleval_note) + "\n"
    if r.reverse is not None:
        write_tsv(r.reverse, output / "reverse_perturbation.tsv")
        write_tsv(r.reverse_per_perturbation, output / "reverse_per_knockout.tsv")
        md += ("\n## Reverse perturbation (top-k accuracy, mean ± sd over splits)\n\n"
               + reverse_markdown(r.reverse) + "\n")
    write_text(output / "perturbation_scores.md", md)
    shown = ["method", "pearson_delta", "pearson_delta_de", "mse_de"]
    shown += [c for c in ("ce_overlap_at_N", "ce_discrimination_score_l1", "ce_mae") if c in r.table]
    print_table(r.table[shown],
                 f"unseen knock-outs, GEARS simulation split x {splits} (mean over knock-outs and splits)")
    typer.echo(r.celleval_note or f"cell-eval layout (real.h5ad, pred_<method>.h5ad): {output / 'cell_eval'}")
    if r.reverse is not None:
        print_table(r.reverse[["method", "top1", "top3", "top10", "chance_top1", "chance_top10"]],
                    "reverse perturbation: is the true knock-out among the k closest predictions?")


