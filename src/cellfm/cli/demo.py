"""`cellfm demo`: the README's first command. Embeds the bundled 300 PBMCs with a built-in model,
shows how well the embedding separates the annotated cell types next to PCA of log counts and
chance, writes the result (to the user cache folder unless `-o` says where) and the next step."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from cellfm.cli.common import load_model
from cellfm.cli.console import fail, one_line_warnings, run_cli
from cellfm.datasets import pbmc_example
from cellfm.embedding.engine import resolve_device
from cellfm.embedding.memory import embed
from cellfm.evaluation.separation import separation_scores
from cellfm.io.write import check_output, write_h5ad


def default_output() -> Path:
    """`$XDG_CACHE_HOME/cellfm/demo/...` (default ~/.cache): not the folder the user stands in."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "cellfm" / "demo" / "pbmc_example_cellfm.h5ad"


def demo(
    output: Path | None = typer.Option(
        None, "-o", "--output", metavar="OUT.h5ad", show_default=False,
        help="Where to write the embedded AnnData (default: ~/.cache/cellfm/demo/pbmc_example_cellfm.h5ad)."),
    model: str = typer.Option("cellfm-mini", "--model", metavar="NAME|PATH",
                              help="Built-in name, model folder or checkpoint."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help="cpu, cuda or auto."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT.h5ad if it exists."),
) -> None:
    """Embed the bundled example cells and score the embedding against PCA and chance."""
    with run_cli() as console, one_line_warnings(console):
        _demo(console, output, model, device, overwrite)


def _demo(console: Console, output: Path | None, model: str, device: str, overwrite: bool) -> None:
    if output is None:  # our own cache file: replacing the previous demo's output is expected
        output, overwrite = default_output(), True
        output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix != ".h5ad":
        fail(f"-o/--output must end in .h5ad (got {output.name})", 2)
    try:
        check_output(output, overwrite=overwrite)
    except FileExistsError:
        fail(f"output {output} already exists; pass --overwrite to replace it, or choose another -o", 2)
    resolve_device(device)
    net = load_model(model)
    adata = pbmc_example()
    embed(adata, net, device=device)
    sep = separation_scores(adata, net, "cell_type", device=device)
    typer.echo(f"\n{adata.n_obs} cells, {sep.n_labelled} labelled with {sep.n_types} types; 5-fold 15-NN "
               "accuracy and cosine silhouette of the types (chance: always guessing the largest type)")
    typer.echo(f"{'embedding':24s} {'kNN acc':>8s} {'silhouette':>11s}")
    for r in sep.table.itertuples():
        typer.echo(f"{r.embedding:24s} {r.knn_acc:8.3f} {r.silhouette:11.3f}")
    typer.echo(f"{'chance (' + sep.largest_type + ')':24s} {sep.chance:8.3f} {'~0':>11s}")
    write_h5ad(adata, output, overwrite=overwrite)
    typer.echo(f"\nwrote {output.resolve()} (obsm['X_cellfm']: {adata.obsm['X_cellfm'].shape})")
    typer.echo("next: embed your own raw counts (.h5ad, 10x folder / .h5, .loom):\n"
               f"  cellfm embed YOUR_COUNTS.h5ad -o YOUR_COUNTS_cellfm.h5ad --model {model}\n"
               "or in Python: cellfm.embed(adata, cellfm.load(\"cellfm-mini\")); "
               "then sc.pp.neighbors(adata, use_rep=\"X_cellfm\")")
