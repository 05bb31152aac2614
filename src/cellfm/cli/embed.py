"""`cellfm embed INPUT -o OUT.h5ad`: cell embeddings into obsm["X_cellfm"].

A thin layer over `cellfm.embed_file`: read (h5ad backed, in row chunks; 10x folder / .h5, loom; a
corpus folder from `cellfm corpus build`, which gives cell names + embedding only),
embed chunk by chunk into OUT.parts/ (resumable; split across processes under `torchrun`), merge
into OUT atomically, print the gene-matching report. Bad input ends the command with one line naming the
problem and the flag that fixes it (exit 2 for bad arguments, 1 for bad data or models, 130 on
Ctrl-C), never a traceback; the input file is only read.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from cellfm.cellfm import load
from cellfm.cli.console import Failure, fail, first_line, one_line_warnings, run_cli
from cellfm.embedding.engine import resolve_device
from cellfm.embedding.stream import check_paths, embed_file, parts_folder


def embed(
    input: Annotated[Path, typer.Argument(
        metavar="INPUT", show_default=False,
        help="Raw counts, cells x genes: .h5ad, 10x matrix folder, 10x .h5 or .loom; or a corpus "
        "folder built by `cellfm corpus build`.")],
    output: Annotated[Path, typer.Option(
        "-o", "--output", metavar="OUT", show_default=False,
        help="Output .h5ad (the input + obsm['X_cellfm']); with --obsm-only .h5ad or .parquet. A corpus "
        "INPUT is no AnnData to extend: it always gives cell names + embedding, as --obsm-only "
        "(.parquet recommended; names are the cell ids, prefixed by the input file name where ids "
        "repeat across inputs).")],
    model: Annotated[str, typer.Option(
        "--model", metavar="NAME|PATH", help="Built-in model name, model folder or checkpoint.",
    )] = "cellfm-mini",
    device: Annotated[str, typer.Option(metavar="DEVICE", help="cpu, cuda or auto.")] = "auto",
    batch_size: Annotated[int | None, typer.Option(
        metavar="N", show_default=False,
        help="Cells per forward pass (default: 16 on CPU, 64 on a GPU).")] = None,
    layer: Annotated[str | None, typer.Option(
        metavar="LAYER", show_default=False,
        help="Take counts from this layer of the input, not X.")] = None,
    use_raw: Annotated[bool, typer.Option(
        "--use-raw", help="Take counts (and genes) from the input's .raw, as scanpy's use_raw.")] = False,
    gene_key: Annotated[str | None, typer.Option(
        metavar="COLUMN", show_default=False,
        help="Column of the input's var with gene symbols / Ensembl ids (default: the var names).")] = None,
    empty: Annotated[str, typer.Option(
        metavar="raise|zero", help="Cells expressing no matched gene: stop, or give zeros.")] = "raise",
    allow_non_integer: Annotated[bool, typer.Option(
        "--allow-non-integer", help="Accept ambient-corrected counts (SoupX, CellBender) that are not "
        "whole numbers; log / CPM data are still refused.")] = False,
    obsm_only: Annotated[bool, typer.Option(
        "--obsm-only", help="Write only cell names + embedding (small .h5ad, or .parquet by name).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    threads: Annotated[int | None, typer.Option(
        metavar="N", show_default=False, help="CPU threads for torch (default: torch's choice).")] = None,
    backed: Annotated[bool, typer.Option("--backed", help="Kept for old scripts: an .h5ad is always "
                                         "read backed, in row chunks.")] = False,
    chunk_cells: Annotated[int | None, typer.Option(
        metavar="N", show_default=False, help="Cells read, embedded and saved at a time (the unit of "
        "resuming; processes under torchrun share the chunks). Default: about 64 chunks of 1,024 to "
        "8,192 cells.")] = None,
    st_tokens: Annotated[bool, typer.Option(
        "--st-tokens", help="Add the two ST tokens (each cell's total count) after CLS, as the authors' "
        "fine-tuning model; needs a model with ST-token weights (e.g. cellfm-80m).")] = False,
) -> None:
    """Embed every cell of a count file with a CellFM model."""
    with run_cli() as console, one_line_warnings(console):
        _embed(console, input, output, model, device, batch_size, layer, use_raw, gene_key, empty,
               allow_non_integer,
               obsm_only, overwrite, threads, backed, chunk_cells, st_tokens)


def _embed(console: Console, input: Path, output: Path, model: str, device: str, batch_size: int | None,
           layer: str | None, use_raw: bool, gene_key: str | None, empty: str, allow_non_integer: bool,
           obsm_only: bool, overwrite: bool, threads: int | None, backed: bool, chunk_cells: int | None,
           st_tokens: bool = False) -> None:
    if threads is not None and threads < 1:
        fail(f"--threads {threads}: give at least 1", 2)
    fmt = check_paths(input, output, obsm_only=obsm_only, overwrite=overwrite)  # before loading a model
    if backed and fmt != "h5ad":
        fail("--backed reads .h5ad files only; leave it out for 10x and loom input", 2)
    obsm_only = obsm_only or fmt == "corpus"  # a corpus has no AnnData to write the embedding into
    if threads is not None:
        torch.set_num_threads(threads)
    resolve_device(device)
    try:
        cfm = load(model)
    except Exception as err:  # noqa: BLE001 - checkpoint readers raise many types for bad files
        fail(f"could not load --model {model}: {first_line(err)}")
    stop = os.environ.get("CELLFM_EMBED_STOP_AFTER_CHUNKS")  # test hook: simulate a killed run
    start = time.perf_counter()
    try:
        result = embed_file(input, cfm, output, obsm_only=obsm_only, batch_size=batch_size, device=device,
                            layer=layer, use_raw=use_raw, gene_key=gene_key, empty=empty,
                            allow_non_integer=allow_non_integer, chunk_cells=chunk_cells, overwrite=overwrite,
                            stop_after_chunks=int(stop) if stop else None, st_tokens=st_tokens)
    except KeyboardInterrupt:
        raise Failure(f"interrupted (Ctrl-C): {output} was not written; the finished chunks stay in "
                      f"{parts_folder(output)} and the same command resumes from them", 130) from None
    seconds = time.perf_counter() - start
    rank = int(os.environ.get("RANK", "0"))
    console.print(f"rank {rank}: embedded {result.computed} chunks, skipped {result.skipped} already done "
                  f"(of {result.n_chunks}) in {result.seconds:.2f} s")
    if result.output is None:  # rank > 0 (rank 0 writes OUT), or stopped by the test hook
        if stop:
            raise Failure(f"stopped after {stop} chunks (CELLFM_EMBED_STOP_AFTER_CHUNKS)", 3)
        return
    print_report(console, result.uns, result.n_cells, seconds, model)
    what = "cell names + obsm['X_cellfm']" if obsm_only else "the input + obsm['X_cellfm']"
    console.print(f"wrote {output}: {what} ({result.n_cells}, {result.uns['model']['d_model']})")


def print_report(console: Console, info: dict, n_cells: int, seconds: float, model: str) -> None:
    if info["layer"] == "corpus":
        console.print(f"corpus {info['corpus']} ({info['n_inputs']} inputs): genes were matched to the "
                      f"vocabulary when it was built")
        console.print(f"embedded {n_cells:,} cells with {model} (d={info['model']['d_model']}) in "
                      f"{seconds:.1f} s ({n_cells / max(seconds, 1e-9):.0f} cells/s)")
        return
    table = Table(title="gene matching", show_header=True)
    table.add_column("genes")
    table.add_column("count", justify="right")
    table.add_row("in the input", f"{info['n_input']:,}")
    table.add_row("matched", f"{info['n_matched']:,}")
    table.add_row("  of which via aliases / Ensembl ids", f"{info['n_remapped']:,}")
    table.add_row("dropped (not in the vocabulary)", f"{info['n_dropped']:,}")
    console.print(table)
    frac = info["n_matched"] / max(info["n_input"], 1)
    if frac < 0.5:
        console.print(f"[yellow]warning:[/] only {frac:.0%} of the genes matched the vocabulary")
    console.print(f"embedded {n_cells:,} cells with {model} (d={info['model']['d_model']}) in "
                  f"{seconds:.1f} s ({n_cells / max(seconds, 1e-9):.0f} cells/s)")
