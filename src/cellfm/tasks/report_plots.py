"""PNG figures for the evaluation report (matplotlib, Agg backend; optional extra `cellfm[plots]`).

Every function writes one file and returns its path, or None when matplotlib is missing (the
report then says so instead of failing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def two_d(emb: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """UMAP when umap-learn is installed, else the first two principal components."""
    try:
        import umap

        return umap.UMAP(random_state=seed).fit_transform(emb), "UMAP"
    except ImportError:
        from sklearn.decomposition import PCA

        return PCA(2, random_state=seed).fit_transform(emb), "PCA (umap-learn not installed)"


def embedding_maps(
    embeddings: dict[str, np.ndarray], obs: pd.DataFrame, keys: list[str], path: Path, seed: int = 0
) -> Path | None:
    """Grid: one row per embedding, one column per obs key (categorical colours)."""
    plt = _plt()
    if plt is None:
        return None
    fig, axes = plt.subplots(
        len(embeddings), len(keys), figsize=(5 * len(keys), 4.2 * len(embeddings)), squeeze=False
    )
    for r, (name, emb) in enumerate(embeddings.items()):
        xy, how = two_d(np.asarray(emb), seed)
        for c, key in enumerate(keys):
            ax = axes[r, c]
            vals = obs[key].astype(str).to_numpy()
            for i, v in enumerate(sorted(set(vals))):
                sel = vals == v
                ax.scatter(xy[sel, 0], xy[sel, 1], s=3, color=plt.cm.tab10(i % 10), label=v, rasterized=True)
            ax.set_title(f"{name}: {key} ({how})", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.legend(markerscale=4, fontsize=6, loc="best", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix_plot(y_true, y_pred, path: Path, title: str) -> Path | None:
    plt = _plt()
    if plt is None:
        return None
    from sklearn.metrics import confusion_matrix

    labels = sorted(set(y_true) | set(y_pred))
    cm = confusion_matrix(y_true, y_pred, labels=labels, normalize="true")
    fig, ax = plt.subplots(figsize=(1 + 0.55 * len(labels), 0.8 + 0.5 * len(labels)))
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j] >= 0.01:
                ax.text(
                    j,
                    i,
                    f"{cm[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if cm[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grouped_bars(
    table: pd.DataFrame,
    group: str,
    method: str,
    value: str,
    path: Path,
    title: str,
    ylim: tuple[float, float] | None = None,
) -> Path | None:
    """Bars of `value` per `group` (x axis), one colour per `method`."""
    plt = _plt()
    if plt is None:
        return None
    pivot = table.pivot_table(index=group, columns=method, values=value, sort=False)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(pivot) + 2), 3.8))
    width = 0.8 / max(1, pivot.shape[1])
    x = np.arange(len(pivot))
    for i, m in enumerate(pivot.columns):
        ax.bar(x + i * width - 0.4 + width / 2, pivot[m].to_numpy(), width, label=str(m))
    ax.set_xticks(x, [str(g) for g in pivot.index], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(value)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
