"""`cellfm demo`: the README's first command. Embeds the bundled 300 PBMCs with a built-in model
and shows how well the embedding separates the annotated cell types, next to PCA of log counts."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    output: Path = typer.Option(Path("pbmc_example_cellfm.h5ad"), "-o", "--output",
                                help="Where to write the embedded AnnData."),
    model: str = typer.Option("cellfm-mini", "--model", help="Built-in name, model folder or checkpoint."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
) -> None:
    """Embed the bundled example cells and score the embedding against PCA."""
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    import cellfm
    from cellfm.datasets import pbmc_example

    adata = pbmc_example()
    net = cellfm.load(model)
    typer.echo(f"model: {net!r}")
    cellfm.embed(adata, net, device=device)

    x = adata.X.toarray().astype(np.float64)
    lognorm = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    pca = PCA(n_components=min(50, net.config.d_model), random_state=0).fit_transform(lognorm)
    known = (adata.obs["cell_type"] != "?").to_numpy()
    labels = adata.obs["cell_type"].to_numpy()[known]
    rows = []
    for name, emb in [("CellFM (X_cellfm)", adata.obsm["X_cellfm"]), ("PCA of log counts", pca)]:
        emb = np.asarray(emb)[known]
        knn = cross_val_score(KNeighborsClassifier(15), emb, labels, cv=5).mean()
        sil = silhouette_score(emb, labels, metric="cosine")
        rows.append((name, knn, sil))
    typer.echo(f"\n{adata.n_obs} cells, {len(set(labels))} labelled types (5-fold 15-NN accuracy, "
               "cosine silhouette of the cell types)")
    typer.echo(f"{'embedding':22s} {'kNN acc':>8s} {'silhouette':>11s}")
    for name, knn, sil in rows:
        typer.echo(f"{name:22s} {knn:8.3f} {sil:11.3f}")
    adata.write_h5ad(output)
    typer.echo(f"\nwrote {output} (obsm['X_cellfm']: {adata.obsm['X_cellfm'].shape})")
