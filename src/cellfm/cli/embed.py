"""`cellfm embed IN.h5ad -o OUT.h5ad`: cell embeddings into obsm["X_cellfm"].

A thin layer over `cellfm.embed.embed`: read, embed, print the gene-matching report, write.
Errors about the input (missing file, bad counts, no matching genes) end the command with a
one-line message and exit code 1 or 2, not a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def embed(
    input: Annotated[Path, typer.Argument(help="Input .h5ad with raw counts (cells x genes).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .h5ad (input + obsm['X_cellfm']).")],
    model: Annotated[str, typer.Option("--model", help="Built-in model name, model folder or checkpoint.")]
    = "cellfm-mini",
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Cells per forward pass.")] = 64,
    layer: Annotated[str | None, typer.Option(help="Take counts from adata.layers[LAYER], not X.")] = None,
    gene_key: Annotated[str | None, typer.Option(help="adata.var column with gene symbols / Ensembl ids.")]
    = None,
    backed: Annotated[bool, typer.Option(help="Read the input backed, in row chunks (large files).")] = False,
) -> None:
    """Embed every cell of an .h5ad file with a CellFM model."""
    import time

    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)  # one-line messages, never wrapped

    def fail(msg: str, code: int = 1) -> None:
        console.print(f"[bold red]error:[/] {msg}")
        raise typer.Exit(code)

    if not input.is_file():
        fail(f"input file {input} does not exist", 2)
    if input.suffix != ".h5ad":
        fail(f"{input} is not an .h5ad file (convert other formats with anndata / scanpy first)", 2)
    if output.resolve() == input.resolve():
        fail("the output must be a different file than the input", 2)
    if not output.parent.exists():
        fail(f"output folder {output.parent} does not exist", 2)

    import anndata as ad

    from cellfm.cellfm import load
    from cellfm.embed import embed as embed_adata

    try:
        adata = ad.read_h5ad(input, backed="r" if backed else None)
    except Exception as err:  # h5py / anndata raise many types for unreadable files
        fail(f"could not read {input}: {err}")
    try:
        cfm = load(model)
    except (FileNotFoundError, ValueError, KeyError) as err:
        fail(f"could not load model {model!r}: {err}")

    start = time.perf_counter()
    try:
        # in place: a backed file is only read; obsm/uns live in memory until written to OUT
        embed_adata(adata, cfm, batch_size=batch_size, device=device, layer=layer, gene_key=gene_key)
    except (ValueError, KeyError) as err:
        fail(str(err).strip("'\""))
    seconds = time.perf_counter() - start
    print_report(console, adata.uns["cellfm"], adata.n_obs, seconds, model)
    adata.write_h5ad(output)
    console.print(f"wrote {output}: obsm['X_cellfm'] {adata.obsm['X_cellfm'].shape}")


def print_report(console, info: dict, n_cells: int, seconds: float, model: str) -> None:
    from rich.table import Table

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
