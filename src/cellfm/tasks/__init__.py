"""Downstream tasks on CellFM embeddings, each evaluated against classical baselines on real data.

One module per task: `annotation` (CellTypeAnnotator), `integration`, `perturbation` (fast
predictors) and `perturbation_benchmark` (GEARS, GEARS + CellFM, baselines; its parts in
`perturbation_gears`, `gears_cell_tokens`, `go_graph`, `perturbation_baselines`), `gene_function`,
`gene_network`, and `report` (runs them all). Shared pieces: `baselines`,
`integration_metrics`, `integration_baselines`, `benchmark_data`, `gene_labels`, `report_plots`;
the annotator is the `annotation` package.
Imports are lazy so that `import cellfm.tasks` stays cheap.
"""

from __future__ import annotations

_EXPORTS = {
    "CellTypeAnnotator": "cellfm.tasks.annotation",
    "AnnotatorConfig": "cellfm.tasks.annotation",
    "evaluate_annotation": "cellfm.tasks.annotation",
    "build_pbmc_batches": "cellfm.tasks.integration",
    "evaluate_integration": "cellfm.tasks.integration",
    "score_embeddings": "cellfm.tasks.integration_metrics",
    "integration_baselines": "cellfm.tasks.integration_baselines",
    "perturbation_effects": "cellfm.tasks.perturbation",
    "evaluate_perturbation": "cellfm.tasks.perturbation",
    "evaluate_perturbation_gears": "cellfm.tasks.perturbation_benchmark",
    "GearsConfig": "cellfm.tasks.perturbation_gears",
    "evaluate_binary_tasks": "cellfm.tasks.gene_function",
    "evaluate_go_terms": "cellfm.tasks.gene_function",
    "gene_neighbours": "cellfm.tasks.gene_network",
    "coannotation_enrichment": "cellfm.tasks.gene_network",
    "evaluate_gene_network": "cellfm.tasks.gene_network",
    "run_evaluation": "cellfm.tasks.report",
    "load_benchmark": "cellfm.tasks.benchmark_data",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cellfm.tasks' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
