"""`cellfm demo`: the README's first command. Embeds the bundled 300 PBMCs with a built-in model,
shows how well the embedding separates the annotated cell types next to PCA of log counts and
chance, writes the result (to the user cache folder unless `-o` says where) and the next step."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from cellfm.cli.console import fail, one_line_warnings, run_cli


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


def _demo(console, output: Path | None, model: str, device: str, overwrite: bool) -> None:
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    import cellfm
    from cellfm.datasets import pbmc_example
    from cellfm.embedding.engine import resolve_device
    from cellfm.io.write import check_output, write_h5ad

    if output is None:  # our own cache file: replacing the previous demo's output is expected
        output, overwrite = default_output(), True
        output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix != ".h5ad":
        fail(f"-o/--output must end in .h5ad (got {output.name})", 2)
    try:
        check_output(output, overwrite=overwrite)
        resolve_device(device)
    except FileExistsError:
        fail(f"output {output} already exists; pass --overwrite to replace it, or choose another -o", 2)
    except (OSError, ValueError) as err:
        fail(str(err), 2)
    try:
        net = cellfm.load(model)
    except Exception as err:  # noqa: BLE001 - checkpoint readers raise many types for bad files
        fail(f"could not load --model {model}: {str(err).splitlines()[0]}")

    adata = pbmc_example()
    typer.echo(f"model: {net!r}")
    cellfm.embed(adata, net, device=device)

    x = adata.X.toarray().astype(np.float64)
    lognorm = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    pca = PCA(n_components=min(50, net.config.d_model), random_state=0).fit_transform(lognorm)
    known = (adata.obs["cell_type"] != "?").to_numpy()
    labels = adata.obs["cell_type"].to_numpy()[known]
    kinds, counts = np.unique(labels, return_counts=True)
    # an untrained model of the same shape: what the pretraining added to the CLS embedding
    import torch

    from cellfm.model import CellFMModule

    torch.manual_seed(0)
    untrained = cellfm.CellFM(net.config, CellFMModule(net.config), vocab=net.vocab)
    random_init = cellfm.embed(adata, untrained, device=device, copy=True, progress=False).obsm["X_cellfm"]
    rows = []
    for name, emb in [("CellFM (X_cellfm)", adata.obsm["X_cellfm"]), ("same model, random init", random_init),
                      ("PCA of log counts", pca)]:
        emb = np.asarray(emb)[known]
        knn = cross_val_score(KNeighborsClassifier(15), emb, labels, cv=5).mean()
        sil = silhouette_score(emb, labels, metric="cosine")
        rows.append((name, f"{knn:8.3f}", f"{sil:11.3f}"))  # (name, kNN, silhouette)
    rows.append((f"chance ({kinds[counts.argmax()]})", f"{counts.max() / counts.sum():8.3f}", f"{'~0':>11s}"))
    typer.echo(f"\n{adata.n_obs} cells, {known.sum()} labelled with {len(kinds)} types; 5-fold 15-NN "
               "accuracy and cosine silhouette of the types (chance: always guessing the largest type)")
    typer.echo(f"{'embedding':24s} {'kNN acc':>8s} {'silhouette':>11s}")
    for name, knn, sil in rows:
        typer.echo(f"{name:24s} {knn} {sil}")
    write_h5ad(adata, output, overwrite=overwrite)
    typer.echo(f"\nwrote {output.resolve()} (obsm['X_cellfm']: {adata.obsm['X_cellfm'].shape})")
    typer.echo("next: embed your own raw counts (.h5ad, 10x folder / .h5, .loom):\n"
               f"  cellfm embed YOUR_COUNTS.h5ad -o YOUR_COUNTS_cellfm.h5ad --model {model}\n"
               "or in Python: cellfm.embed(adata, cellfm.load(\"cellfm-mini\")); "
               "then sc.pp.neighbors(adata, use_rep=\"X_cellfm\")")
