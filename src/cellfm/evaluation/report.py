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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cellfm.embedding.memory import as_model
from cellfm.evaluation import sections
from cellfm.evaluation.data import resolve_data_dir
from cellfm.evaluation.markdown import markdown_table
from cellfm.evaluation.results import EvaluationConfig, EvaluationReport, RunContext, SectionResult
from cellfm.io.write import write_text

if TYPE_CHECKING:
    from cellfm.cellfm import CellFM

log = logging.getLogger(__name__)
# task -> (section title, section function)
SECTIONS: dict[str, tuple[str, Callable[[RunContext], SectionResult]]] = {
    "cell_identity": ("Cell identity of the frozen CLS embedding", sections.cell_identity_section),
    "annotation": ("Cell type annotation", sections.annotation_section),
    "integration": ("Batch integration", sections.integration_section),
    "perturbation": ("Perturbation effect prediction", sections.perturbation_section),
    "gene_function": ("Gene function", sections.gene_function_section),
    "gene_network": ("Gene networks", sections.gene_network_section),
}


def run_evaluation(
    model: CellFM | str | Path,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    config: EvaluationConfig | None = None,
    model_name: str | None = None,
) -> EvaluationReport:
    """Run the tasks of `config` and write `report.md`, `results.json` and PNGs into `out_dir`.

    `data_dir`: the evaluation data folder (None: CELLFM_DATA_DIR). `model_name`: how the report
    names the model (default: the name or path given, else "in-memory model").
    """
    cfg = config or EvaluationConfig()
    data = resolve_data_dir(data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = model_name or (str(model) if isinstance(model, (str, Path)) else "in-memory model")
    ctx = RunContext(as_model(model), data, out, cfg)
    done: dict[str, SectionResult] = {}
    failed: dict[str, str] = {}
    record: dict = {"model": name, "quick": cfg.quick, "seed": cfg.seed}
    body: list[str] = []
    for task in (t for t in SECTIONS if t in cfg.tasks):
        title, fn = SECTIONS[task]
        t0 = time.time()
        try:
            res = fn(ctx)
        except Exception as err:  # one failed task must not hide the others
            log.error("%s failed: %s", title, err)
            failed[title] = f"{type(err).__name__}: {err}"
            body.append(f"## {title}\n\n**Failed**: `{failed[title]}`\n")
            record[title] = {"error": failed[title], "traceback": traceback.format_exc()}
            continue
        done[title] = res
        body.append(f"## {title}\n\n{res.text}\n\n_{time.time() - t0:.0f} s_\n")
        record[title] = res.record
    summary = summary_table(list(done.values()))
    head = [
        "# CellFM downstream evaluation\n",
        f"Model: `{name}`: {ctx.model!r}  \nData: `{data}`  \nSeed {cfg.seed}; quick={cfg.quick}. "
        f"Generated {time.strftime('%Y-%m-%d %H:%M')}.\n",
    ]
    if len(summary):
        head.append("## Summary: CellFM vs the best baseline\n\n" + markdown_table(summary) + "\n")
    write_text(out / "report.md", "\n".join(head + body))
    write_text(out / "results.json", json.dumps(record, indent=1, default=_jsonable) + "\n")
    return EvaluationReport(out / "report.md", out / "results.json", done, failed, summary)


def summary_table(results: list[SectionResult]) -> pd.DataFrame:
    """One row per headline: the best CellFM variant next to the best baseline."""
    rows = []
    for h in (h for r in results for h in r.headlines):
        if h.table is None or not len(h.table):
            continue
        t = h.table.groupby(h.key, sort=False)[h.value].mean()
        mine = t[[i for i in t.index if h.is_cellfm(str(i))]]
        base = t[[i for i in t.index if not h.is_cellfm(str(i))]]
        if len(mine) and len(base):
            rows.append({"task": h.task, "metric": h.metric,
                         "CellFM": mine.max(), "CellFM variant": mine.idxmax(),
                         "best baseline": base.max(), "baseline": base.idxmax()})
    return pd.DataFrame(rows)


def _jsonable(v):
    if isinstance(v, pd.DataFrame):
        return v.to_dict(orient="records")
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
