"""`cellfm response`: drug and stimulus response with CellOT, a thin layer over
`cellfm.tasks.response.predict_response`. Every input check runs before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellfm.cli.common import ThreadsOpt, load_model, print_table, read_input, set_threads, write_tsv
from cellfm.cli.console import fail, run_cli
from cellfm.io.write import write_h5ad, write_text
from cellfm.tasks.cellot import CellOTConfig
from cellfm.tasks.response import ResponseConfig, predict_response
from cellfm.tasks.response_scores import response_markdown


def response(
    input: Annotated[Path | None, typer.Option(
        "--input", metavar="PATH", show_default=False,
        help="Cells with raw counts in X (.h5ad, 10x, loom) and a treatment column.")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", metavar="DIR", show_default=False,
        help="Output folder: scores.tsv, scores.md, predicted.h5ad.")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", metavar="NAME|PATH", show_default=False,
        help="CellFM model for the cell embeddings: cellfm-80m, cellfm-800m, a folder or checkpoint, "
        "or cellfm-mini.")] = None,
    condition_key: Annotated[str, typer.Option(metavar="COLUMN", help="obs column of the treatment.")]
    = "condition",
    control: Annotated[str, typer.Option(metavar="NAME", help="Condition of the control cells.")] = "ctrl",
    treated: Annotated[list[str] | None, typer.Option(
        metavar="NAME", show_default=False,
        help="A treated condition (repeat for several; default: every condition but the control).")] = None,
    group_key: Annotated[str | None, typer.Option(
        metavar="COLUMN", show_default=False,
        help="obs column of groups (cell type, donor, replicate) to hold out in turn: the "
        "out-of-distribution setting.")] = None,
    size_factor_key: Annotated[str | None, typer.Option(
        metavar="COLUMN", show_default=False,
        help="obs column of each cell's total count (a targeted panel's size factor; default: the "
        "cell's total over X).")] = None,
    max_cells_per_condition: Annotated[int, typer.Option(
        metavar="N", help="Cells kept per condition, seeded (0: all).")] = 0,
    n_hvg: Annotated[int, typer.Option(metavar="N", help="Highly variable genes: the common space.")] = 1000,
    n_pcs: Annotated[int, typer.Option(metavar="N", help="Principal components of the PCA space.")] = 50,
    test_fraction: Annotated[float, typer.Option(metavar="X", help="Cells held out in the i.i.d. setting.")]
    = 0.3,
    iters: Annotated[int, typer.Option(metavar="N", help="CellOT outer steps (10 inner steps each).")] = 200,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the split, subsample and CellOT.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace files in DIR.")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Predict treated cells from control cells with CellOT on CellFM embeddings and on PCA, beside
    identity and the mean shift; held-out cells and held-out groups."""
    with run_cli() as console:
        _response(console, input, output, model, condition_key, control, treated or [], group_key,
                  size_factor_key, max_cells_per_condition, n_hvg, n_pcs, test_fraction, iters, seed,
                  overwrite, threads)


def _response(console, input, output, model, condition_key, control, treated, group_key, size_factor_key,
              max_cells_per_condition, n_hvg, n_pcs, test_fraction, iters, seed, overwrite, threads) -> None:
    for flag, value in [("--input", input), ("-o/--output", output), ("--model", model)]:
        if value is None:
            fail(f"{flag} is required (cellfm response --input X.h5ad --condition-key K --control C "
                 "--model M -o DIR)", 2)
    if iters < 1 or max_cells_per_condition < 0:
        fail("--iters must be >= 1 and --max-cells-per-condition >= 0", 2)
    names = ["scores.tsv", "scores.md", "predicted.h5ad"]
    if output.exists() and not overwrite and any((output / n).exists() for n in names):
        fail(f"{output} already holds results; pass --overwrite to replace them", 2)
    set_threads(threads)
    adata = read_input(input)
    cfm = load_model(model)
    cfg = ResponseConfig(
        condition_key=condition_key, control=control, treated=tuple(treated), group_key=group_key,
        size_factor_key=size_factor_key, n_hvg=n_hvg, n_pcs=n_pcs, test_fraction=test_fraction,
        max_cells_per_condition=max_cells_per_condition or None, seed=seed,
        cellot=CellOTConfig(iters=iters, seed=seed))
    r = predict_response(adata, cfm, cfg, log=lambda m: console.print(m, markup=False))  # under run_cli
    output.mkdir(parents=True, exist_ok=True)
    write_tsv(r.scores, output / "scores.tsv")
    write_text(output / "scores.md", response_markdown(r.scores))
    write_h5ad(r.predicted, output / "predicted.h5ad", overwrite=True)
    summary = r.scores.groupby(["setting", "method", "space"], sort=False)[
        ["mmd", "mmd_expr", "l2_mean_expr", "pearson_shift_expr"]].mean().reset_index()
    print_table(summary, "mean over treated conditions and held-out sets (expr: HVG expression)")
    typer.echo(f"wrote {output / 'scores.tsv'}, scores.md and predicted.h5ad")
