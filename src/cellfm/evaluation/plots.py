"""PNG figures for the evaluation report (matplotlib, Agg backend; optional extra `cellfm[plots]`).

Every figure is meant to be read without the code: axes say what is measured and on what scale,
ticks use words instead of column keys, reference lines mark chance and the best possible score,
legends sit outside the data, cell types and batches use different palettes, and unlabelled cells
are grey "unlabelled" points under the others. Every function writes one file and returns its
path, or None when matplotlib is missing (the report then says how to install it).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from cellfm.contract.labels import is_unlabelled

INSTALL_HINT = 'pip install "cellfm[plots]"'
# column keys -> words for tick labels
READABLE = {
    "batch_score": "batch mixing",
    "bio_score": "bio conservation",
    "overall": "overall (0.6 bio + 0.4 batch)",
    "Total": "total (0.6 bio + 0.4 batch)",
    "pearson_all": "all genes",
    "pearson_top_de": "top-20 changed genes",
    "coarse_type": "cell type",
    "batch": "batch (data set)",
}
TYPE_PALETTE = "tab10"  # cell types ...
BATCH_PALETTE = "Set2"  # ... and batches (pastel) never share a palette or look alike


def readable(key: object, width: int = 16) -> str:
    text = READABLE.get(str(key), str(key).replace("_", " "))
    return "\n".join(textwrap.wrap(text, width)) or text


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path) -> Path:
    """Tight bounding box: titles and outside legends are never cut."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def two_d(emb: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """UMAP when umap-learn is installed, else the first two principal components."""
    try:
        import umap

        return umap.UMAP(random_state=seed).fit_transform(emb), "UMAP"
    except ImportError:
        from sklearn.decomposition import PCA

        return PCA(2, random_state=seed).fit_transform(emb), "PC"


def _categories(values: pd.Series) -> np.ndarray:
    return np.where(is_unlabelled(values), "unlabelled", values.astype(str).to_numpy())


def embedding_maps(
    embeddings: dict[str, np.ndarray], obs: pd.DataFrame, keys: list[str], path: Path, seed: int = 0
) -> Path | None:
    """Grid: one row per embedding, one column per obs key. A key whose name says batch gets the
    batch palette, any other the cell-type palette; colours are fixed per category across rows."""
    plt = _plt()
    if plt is None:
        return None
    fig, axes = plt.subplots(len(embeddings), len(keys), figsize=(6.5 * len(keys), 4.2 * len(embeddings)),
                             squeeze=False, gridspec_kw={"wspace": 0.55})  # room for the legends
    cats = {k: _categories(obs[k]) for k in keys}
    for r, (name, emb) in enumerate(embeddings.items()):
        xy, how = two_d(np.asarray(emb), seed)
        for c, key in enumerate(keys):
            ax, vals = axes[r, c], cats[key]
            cmap = plt.get_cmap(BATCH_PALETTE if "batch" in key.lower() else TYPE_PALETTE)
            sel = vals == "unlabelled"
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=2, color="0.82", label="unlabelled", rasterized=True)
            for i, v in enumerate(sorted(set(vals) - {"unlabelled"})):
                sel = vals == v
                ax.scatter(xy[sel, 0], xy[sel, 1], s=3, color=cmap(i % cmap.N), label=v, rasterized=True)
            ax.set_title(f"{name}\ncoloured by {readable(key, 40)}", fontsize=9)
            ax.set_xlabel(f"{how} 1")
            ax.set_ylabel(f"{how} 2")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.legend(markerscale=4, fontsize=7, frameon=False, loc="upper left",
                          bbox_to_anchor=(1.0, 1.0), title=readable(key, 40), title_fontsize=8)
    return _save(fig, path)


def confusion_matrix_plot(y_true, y_pred, path: Path, title: str) -> Path | None:
    """Row-normalised confusion matrix (each true type sums to 1); the title says so and gives n."""
    plt = _plt()
    if plt is None:
        return None
    from sklearn.metrics import confusion_matrix

    y_true = _categories(pd.Series(list(y_true)))
    y_pred = _categories(pd.Series(list(y_pred)))
    labels = sorted(set(y_true) | set(y_pred))
    cm = confusion_matrix(y_true, y_pred, labels=labels, normalize="true")
    fig, ax = plt.subplots(figsize=(2.5 + 0.55 * len(labels), 1.5 + 0.5 * len(labels)))
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j] >= 0.01:
                ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if cm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted type")
    ax.set_ylabel("true type")
    head = "\n".join(textwrap.wrap(title, 50))
    ax.set_title(f"{head}\nrow-normalised, n = {len(y_true):,} cells", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("fraction of the true type's cells")
    return _save(fig, path)


def grouped_bars(
    table: pd.DataFrame,
    group: str,
    method: str,
    value: str,
    path: Path,
    title: str,
    ylim: tuple[float, float] | None = None,
    *,
    ylabel: str,
    chance: float | dict | None = None,
    chance_label: str = "chance",
    best: float | None = None,
) -> Path | None:
    """Bars of `value` per `group` (x axis), one colour per `method`; `ylabel` says what and on
    which scale. `chance` draws a dashed line (one value, or one per group as a dict); `best`
    a dotted line at the best possible score (e.g. 1.0)."""
    plt = _plt()
    if plt is None:
        return None
    pivot = table.pivot_table(index=group, columns=method, values=value, sort=False)
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(pivot) + 2), 3.8))
    width = 0.8 / max(1, pivot.shape[1])
    x = np.arange(len(pivot))
    for i, m in enumerate(pivot.columns):
        ax.bar(x + i * width - 0.4 + width / 2, pivot[m].to_numpy(), width, label=str(m))
    ax.set_xticks(x, [readable(g) for g in pivot.index], fontsize=8)
    ax.set_ylabel(ylabel)
    if isinstance(chance, dict):
        for i, g in enumerate(pivot.index):
            if g in chance:
                ax.hlines(chance[g], i - 0.45, i + 0.45, colors="0.25", linestyles="--",
                          label=chance_label if i == 0 else None)
    elif chance is not None:
        ax.axhline(chance, color="0.25", linestyle="--", linewidth=1, label=chance_label)
    if best is not None:
        ax.axhline(best, color="0.5", linestyle=":", linewidth=1, label=f"best possible ({best:g})")
    if ylim:
        ax.set_ylim(ylim[0], max(ylim[1], (best or 0) * 1.04))
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=10)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)
