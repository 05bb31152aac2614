"""User workflows on CellFM embeddings, one module (or a few `name_*` modules) per task.

`annotation` (CellTypeAnnotator), `integration` (score an embedding's batch mixing;
`integration_finetune`, `integration_metrics`), `perturbation` (fast predictors) and
`perturbation_benchmark` (GEARS, GEARS + CellFM; parts in `perturbation_gears`,
`gears_cell_tokens`, `go_graph`, `perturbation_baselines`), `gene_function` and `gene_network`.
The fixed data sets, baselines and report that measure them live in `cellfm.evaluation`.
Imports are lazy so that `import cellfm.tasks` stays cheap.
"""

from __future__ import annotations

from cellfm.lazy_exports import lazy_exports

_EXPORTS = {
    "CellTypeAnnotator": "cellfm.tasks.annotation",
    "AnnotatorConfig": "cellfm.tasks.annotation",
    "evaluate_annotation": "cellfm.tasks.annotation",
    "IntegrationConfig": "cellfm.tasks.integration",
    "IntegrationResult": "cellfm.tasks.integration",
    "evaluate_integration": "cellfm.tasks.integration",
    "score_embeddings": "cellfm.tasks.integration_metrics",
    "perturbation_effects": "cellfm.tasks.perturbation",
    "evaluate_perturbation": "cellfm.tasks.perturbation",
    "evaluate_perturbation_gears": "cellfm.tasks.perturbation_benchmark",
    "GearsConfig": "cellfm.tasks.perturbation_gears",
    "evaluate_binary_tasks": "cellfm.tasks.gene_function",
    "evaluate_go_terms": "cellfm.tasks.gene_function",
    "gene_neighbours": "cellfm.tasks.gene_network",
    "coannotation_enrichment": "cellfm.tasks.gene_network",
    "evaluate_gene_network": "cellfm.tasks.gene_network",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
