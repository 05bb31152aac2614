"""Report figures a reader understands without the code: labelled axes, words for ticks, chance
and best-score lines, legends outside the bars, unlabelled cells as "unlabelled", separate
palettes for cell types and batches, a titled row-normalised confusion matrix; and the install
hint when matplotlib is missing. Figures are built from the bundled real PBMCs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from matplotlib.colors import to_hex  # noqa: E402

from cellfm.datasets import pbmc_example  # noqa: E402
from cellfm.evaluation import plots as report_plots  # noqa: E402


@pytest.fixture
def figures(monkeypatch, tmp_path):
    """Keep each figure open for inspection (and still write it)."""
    kept = []

    def save(fig, path):
        fig.savefig(path, bbox_inches="tight")
        kept.append(fig)
        return path

    monkeypatch.setattr(report_plots, "_save", save)
    yield kept
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="module")
def pbmc():
    adata = pbmc_example()
    x = adata.X.toarray().astype(np.float64)
    from sklearn.decomposition import PCA

    emb = PCA(10, random_state=0).fit_transform(np.log1p(x / x.sum(1, keepdims=True) * 1e4))
    obs = pd.DataFrame({"coarse_type": adata.obs["cell_type"].astype(object).replace("?", None).to_numpy(),
                        "batch": np.where(np.arange(adata.n_obs) % 2, "pbmc4k", "pbmc3k")})
    return emb, obs


def test_bars_have_units_words_reference_lines_and_outside_legend(figures, tmp_path):
    table = pd.DataFrame({"method": ["CellFM", "HVG+PCA"] * 3,
                          "score": ["batch_score"] * 2 + ["bio_score"] * 2 + ["overall"] * 2,
                          "value": [0.4, 0.5, 0.7, 0.6, 0.58, 0.56]})
    path = report_plots.grouped_bars(table, "score", "method", "value", tmp_path / "b.png",
                                     "Batch integration", (0, 1), ylabel="score (0 to 1)", chance=0.5,
                                     best=1.0)
    assert path.is_file()
    ax = figures[-1].axes[0]
    assert ax.get_ylabel() == "score (0 to 1)"
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[0] == "batch mixing" and not any("_" in t for t in ticks)
    lines = {round(float(line.get_ydata()[0]), 3) for line in ax.get_lines()}
    assert {0.5, 1.0} <= lines and ax.get_ylim()[1] > 1.0  # the best-score line is visible
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "chance" in labels and "best possible (1)" in labels
    figures[-1].canvas.draw()
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.x0 >= ax.get_window_extent().x1  # outside the bars


def test_maps_unlabelled_grey_and_separate_palettes(figures, pbmc, tmp_path, monkeypatch):
    emb, obs = pbmc
    monkeypatch.setattr(report_plots, "two_d", lambda e, seed=0: (np.asarray(e)[:, :2], "PC"))  # no UMAP jit
    report_plots.embedding_maps({"PCA of log counts": emb}, obs, ["coarse_type", "batch"], tmp_path / "m.png")
    types_ax, batch_ax = figures[-1].axes[:2]
    type_labels = [t.get_text() for t in types_ax.get_legend().get_texts()]
    assert "unlabelled" in type_labels and "None" not in type_labels and "?" not in type_labels
    colours = {ax: {to_hex(c.get_facecolor()[0]) for c in ax.collections} for ax in (types_ax, batch_ax)}
    assert to_hex("0.82") in colours[types_ax]
    assert not (colours[types_ax] - {to_hex("0.82")}) & colours[batch_ax]
    assert "coloured by cell type" in types_ax.get_title() and "batch" in batch_ax.get_title()
    assert types_ax.get_xlabel() == "PC 1"


def test_confusion_matrix_title_says_row_normalised_and_n(figures, pbmc, tmp_path):
    _, obs = pbmc
    truth = obs["coarse_type"].to_numpy()
    pred = np.roll(truth, 5)
    report_plots.confusion_matrix_plot(truth, pred, tmp_path / "c.png", "CellFM (frozen) on held-out cells")
    ax = figures[-1].axes[0]
    assert f"row-normalised, n = {len(truth)} cells" in ax.get_title()
    assert ax.get_xlabel() == "predicted type" and ax.get_ylabel() == "true type"
    assert "None" not in [t.get_text() for t in ax.get_yticklabels()]


def test_report_names_the_plots_extra_without_matplotlib(monkeypatch, tmp_path):
    from cellfm.evaluation.markdown import figure_link

    monkeypatch.setattr(report_plots, "_plt", lambda: None)
    assert report_plots.grouped_bars(pd.DataFrame({"g": ["a"], "m": ["x"], "v": [1.0]}), "g", "m", "v",
                                     tmp_path / "x.png", "t", ylabel="v") is None
    assert 'pip install "cellfm[plots]"' in figure_link(None, "bars")
