"""`run_evaluation`: every downstream task on the real data, one Markdown report with tables and PNGs.

The report states the model, the data, the splits and every baseline next to the CellFM number, so
a reader can judge the model without running anything. A task that fails (e.g. missing data) is
reported as failed with its error; the others still run.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cellfm.embedding.memory import as_model as resolve_model
from cellfm.evaluation import sections as task
from cellfm.evaluation.data import load_benchmark, resolve_data_dir
from cellfm.evaluation.markdown import markdown_table
from cellfm.wording import UsageError

if TYPE_CHECKING:
    from cellfm.cellfm import CellFM

log = logging.getLogger(__name__)
TASKS = ("cell_identity", "annotation", "integration", "perturbation", "gene_function", "gene_network")


def run_evaluation(
    model: CellFM | str | Path,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    tasks: tuple[str, ...] = TASKS,
    annotation_mode: str = "frozen",
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    model_name: str | None = None,
    integration_finetune_epochs: int = 1,
) -> Path:
    """Run `tasks` and write `report.md`, `results.json` and PNGs into `out_dir`.

    `quick` subsamples cells and genes (minutes on a laptop CPU instead of tens of minutes).
    `data_dir`: the evaluation data folder (None: CELLFM_DATA_DIR).
    """

    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise UsageError(f"unknown tasks {unknown}; choose from {list(TASKS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(data_dir)
    name = model_name or (str(model) if not hasattr(model, "module") else "in-memory model")
    model = resolve_model(model)
    sections: list[str] = [
        "# CellFM downstream evaluation\n",
        f"Model: `{name}`: {model!r}  \nData: `{data_dir}`  \nSeed {seed}; quick={quick}. "
        f"Generated {time.strftime('%Y-%m-%d %H:%M')}.\n",
    ]
    results: dict = {"model": name, "quick": quick, "seed": seed}

    def section(title: str, fn) -> None:
        t0 = time.time()
        try:
            text, res = fn()
            sections.append(f"## {title}\n\n{text}\n\n_{time.time() - t0:.0f} s_\n")
            results[title] = res
        except Exception as err:  # one failed task must not hide the others
            log.error("%s failed: %s", title, err)
            sections.append(f"## {title}\n\n**Failed**: `{type(err).__name__}: {err}`\n")
            results[title] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}

    reference = None

    def get_reference():
        nonlocal reference
        if reference is None:
            reference = load_benchmark("pbmc4k", data_dir)
        return reference

    if "cell_identity" in tasks:
        section("Cell identity of the frozen CLS embedding",
                lambda: task.cell_identity_section(model, data_dir, quick, seed))
    if "annotation" in tasks:
        section(
            "Cell type annotation",
            lambda: task.annotation_section(model, data_dir, out, annotation_mode, quick, seed, progress),
        )
    if "integration" in tasks:
        section(
            "Batch integration",
            lambda: task.integration_section(model, data_dir, out, quick, seed, progress,
                                             integration_finetune_epochs),
        )
    if "perturbation" in tasks:
        section(
            "Perturbation effect prediction",
            lambda: task.perturbation_section(model, data_dir, out, get_reference(), seed, quick, progress),
        )
    if "gene_function" in tasks:
        section(
            "Gene function",
            lambda: task.gene_function_section(model, data_dir, out, get_reference(), quick, seed, progress),
        )
    if "gene_network" in tasks:
        section("Gene networks",
                lambda: task.gene_network_section(model, data_dir, out, get_reference(), seed, progress))

    summary = summary_table(results)
    if len(summary):
        sections.insert(2, "## Summary: CellFM vs the best baseline\n\n" + markdown_table(summary) + "\n")
    (out / "report.md").write_text("\n".join(sections))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")
    return out / "report.md"


def summary_table(results: dict) -> pd.DataFrame:
    """One row per task: the headline metric of CellFM next to the best baseline."""
    rows = []

    def add(task, metric, table, key, cellfm_rows, value):
        if table is None or not len(table):
            return
        t = table.groupby(key, sort=False)[value].mean()
        is_mine = cellfm_rows if callable(cellfm_rows) else (lambda name: name.startswith(cellfm_rows))
        mine = t[[i for i in t.index if is_mine(str(i))]]
        base = t[[i for i in t.index if not is_mine(str(i))]]
        if len(mine) and len(base):
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "CellFM": mine.max(),
                    "CellFM variant": mine.idxmax(),
                    "best baseline": base.max(),
                    "baseline": base.idxmax(),
                }
            )

    get = lambda title, key: results.get(title, {}).get(key) if isinstance(results.get(title), dict) else None  # noqa: E731
    add("cell identity (frozen CLS)", "15-NN accuracy, mean over data sets",
        get("Cell identity of the frozen CLS embedding", "table"), "embedding", "CellFM", "knn_acc")
    add(
        "annotation",
        "macro-F1, mean over data sets",
        get("Cell type annotation", "table"),
        "method",
        "CellFM",
        "macro_f1",
    )
    scorer = get("Batch integration", "scorer") or ""
    metric = ("scib-metrics Total" if scorer.startswith("scib-metrics")
              else "Total (approximate, no scib-metrics)")
    add("integration", metric, get("Batch integration", "table"), "method", "CellFM", "Total")
    if get("Perturbation effect prediction", "method") == "gears":
        add("perturbation (unseen knock-outs)", "Pearson of Δ, top-20 DE genes",
            get("Perturbation effect prediction", "table"), "method", lambda name: "CellFM" in name,
            "pearson_delta_de")
    else:
        add("perturbation", "Pearson, top-20 DE genes", get("Perturbation effect prediction", "table"),
            "method", "CellFM", "pearson_top_de")
    add(
        "gene function (binary)",
        "AUROC, mean over tasks",
        get("Gene function", "binary"),
        "method",
        "CellFM",
        "auroc",
    )
    add(
        "gene function (GO)",
        "AUPR, mean over BP/MF/CC",
        get("Gene function", "go"),
        "method",
        "CellFM",
        "aupr",
    )
    net = get("Gene networks", "table")
    if net is not None:
        add(
            "gene network (GO BP)",
            "fold enrichment",
            net[net["annotation"] == "GO BP"],
            "method",
            "CellFM",
            "fold_enrichment",
        )
    return pd.DataFrame(rows)


def _jsonable(v):
    if isinstance(v, pd.DataFrame):
        return v.to_dict(orient="records")
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
