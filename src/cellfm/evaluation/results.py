"""What one run of the evaluation report takes (`EvaluationConfig`, `RunContext`) and gives
(`SectionResult` per task with its `Headline`s, `EvaluationReport`). Types only, no task code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import pandas as pd

from cellfm.evaluation.data import load_benchmark
from cellfm.wording import UsageError, arg

if TYPE_CHECKING:
    from cellfm.cellfm import CellFM

TASKS = ("cell_identity", "annotation", "integration", "perturbation", "gene_function", "gene_network")


@dataclass(frozen=True)
class EvaluationConfig:
    """Which tasks run and how long they take; every section reads its settings from here."""

    tasks: tuple[str, ...] = TASKS
    annotation_mode: str = "frozen"  # CellTypeAnnotator mode: frozen, lora or full
    quick: bool = False  # subsample cells and genes: minutes on a laptop CPU, not tens of minutes
    seed: int = 0
    integration_finetune_epochs: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise UsageError(f"unknown tasks {unknown} in {arg('tasks')}; choose from {', '.join(TASKS)}")


@dataclass
class RunContext:
    """What every section gets: the model, where the data and the report are, the settings, and
    the PBMC 4k reference cells (read once, by the first section that asks)."""

    model: CellFM
    data_dir: Path
    out: Path
    config: EvaluationConfig
    _reference: ad.AnnData | None = field(default=None, repr=False)

    def reference(self) -> ad.AnnData:
        if self._reference is None:
            self._reference = load_benchmark("pbmc4k", self.data_dir)
        return self._reference


def is_cellfm_row(name: str) -> bool:
    return name.startswith("CellFM")


@dataclass(frozen=True)
class Headline:
    """One row of the report's summary: `value` of the best CellFM row of `table` (grouped by
    `key`, averaged) next to the best other row."""

    task: str
    metric: str
    table: pd.DataFrame
    key: str  # the column naming the method / embedding
    value: str  # the column holding the score (higher is better)
    is_cellfm: Callable[[str], bool] = is_cellfm_row


@dataclass
class SectionResult:
    text: str  # the section's Markdown, figures linked
    record: dict  # what results.json keeps of it (tables, settings)
    headlines: list[Headline] = field(default_factory=list)


@dataclass
class EvaluationReport:
    path: Path  # report.md
    results_path: Path  # results.json
    sections: dict[str, SectionResult]  # title -> result, for the tasks that ran
    failed: dict[str, str]  # title -> "ErrorType: message", for those that did not
    summary: pd.DataFrame  # one row per headline: CellFM vs the best baseline
