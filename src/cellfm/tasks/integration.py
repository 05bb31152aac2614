"""Batch integration: how well an embedding mixes batches while keeping cell types apart.

`evaluate_integration(adata, model)` embeds the cells (zero-shot, and optionally after
self-supervised fine-tuning, `integration_finetune`), runs HVG+PCA, Harmony and scVI on the same
cells (`evaluation.integration_baselines`) and scores them all with scib-metrics
(`integration_metrics`); every optional package is reported as run or not run. The caller's
AnnData is only read: the embeddings come back in the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from cellfm.embedding.memory import embed
from cellfm.evaluation.integration_baselines import integration_baselines
from cellfm.tasks.integration_finetune import fine_tune_for_integration
from cellfm.tasks.integration_metrics import score_embeddings, scoring_frame
from cellfm.wording import UsageError, arg

if TYPE_CHECKING:
    import torch

    from cellfm.cellfm import CellFM

ZERO_SHOT = "CellFM (zero-shot)"


@dataclass(frozen=True)
class IntegrationConfig:
    """What `evaluate_integration` runs besides the zero-shot embedding."""

    finetune_epochs: int = 0  # > 0: also score after self-supervised fine-tuning on these cells
    st_tokens: bool = True  # fine-tune the authors' ST-token model, as their tutorial does
    harmony: bool = True  # Harmony on the HVG+PCA when harmonypy is installed
    scvi_epochs: int = 20  # scVI epochs when scvi-tools is installed (0: skip scVI)
    scorer: str = "auto"  # `integration_metrics.score_embeddings`
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("finetune_epochs", "scvi_epochs"):
            if getattr(self, name) < 0:
                raise UsageError(f"{arg(name, getattr(self, name))} must be 0 (skip) or more")


@dataclass
class IntegrationResult:
    """Scores of every method on the same cells, the embeddings they were computed from and what
    ran (or why not)."""

    table: pd.DataFrame  # one row per method: "method", metric columns, then the aggregates
    embeddings: dict[str, np.ndarray]  # method -> (N, d), rows as in the input
    methods: dict[str, str]  # method -> what ran, or why not
    scorer: str  # which scorer made the numbers
    n_scored: int  # labelled cells scored
    obs: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)  # batch and label per cell

    def describe(self) -> str:
        """One line per method saying what ran (or why not), and which scorer made the numbers."""
        lines = [f"scores: {self.scorer} on {self.n_scored} labelled cells"]
        return "\n".join(lines + [f"{m}: {note}" for m, note in self.methods.items()])


def evaluate_integration(
    adata: ad.AnnData,
    model: CellFM,
    *,
    batch_key: str = "batch",
    label_key: str = "coarse_type",
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    allow_non_integer: bool = False,
    config: IntegrationConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> IntegrationResult:
    """Score the CellFM embedding of `adata`'s cells next to HVG+PCA, Harmony and scVI.

    The cells pass the input contract (`cellfm.contract.setup_cells`: `layer`, `use_raw`,
    `gene_key`, `allow_non_integer`); the baselines read the same counts. Cells without a label
    are embedded and corrected but not scored. `device` None: CUDA when available.
    """
    cfg = config or IntegrationConfig()
    batches, labels = scoring_frame(adata, batch_key, label_key)
    setup = {"layer": layer, "use_raw": use_raw, "gene_key": gene_key, "allow_non_integer": allow_non_integer}
    own = embed(adata, model, device=device, progress=progress, empty="zero", copy=True, seed=cfg.seed,
                **setup)
    embeddings = {ZERO_SHOT: own.obsm["X_cellfm"]}
    methods = {ZERO_SHOT: "CLS embedding of the model as loaded"}
    if cfg.finetune_epochs > 0:
        tuned = fine_tune_for_integration(
            adata, model, epochs=cfg.finetune_epochs, st_tokens=cfg.st_tokens, device=device,
            seed=cfg.seed, progress=progress, setup=setup,
        )
        name = f"CellFM (fine-tuned, {cfg.finetune_epochs} ep)"
        embeddings[name] = embed(own, tuned, device=device, progress=progress, empty="zero", seed=cfg.seed,
                                 key_added="X_cellfm_finetuned", **setup).obsm["X_cellfm_finetuned"]
        methods[name] = ("self-supervised integration fine-tuning on these cells"
                         + (", the authors' ST-token model" if cfg.st_tokens else ", CLS only"))
    base = integration_baselines(
        _counts(adata, layer, use_raw), batch_key, harmony=cfg.harmony, scvi_epochs=cfg.scvi_epochs,
        seed=cfg.seed, progress=progress,
    )
    embeddings.update(base.embeddings)
    methods.update(base.notes)
    scores = score_embeddings(embeddings, batches, labels, unintegrated="HVG+PCA", scorer=cfg.scorer,
                              seed=cfg.seed, progress=progress)
    obs = pd.DataFrame({batch_key: batches, label_key: labels}, index=adata.obs_names)
    return IntegrationResult(scores.table, embeddings, methods, scores.scorer, scores.n_cells, obs)


def _counts(adata: ad.AnnData, layer: str | None, use_raw: bool) -> ad.AnnData:
    """The counts the contract read, as X of a new AnnData sharing `adata`'s arrays (no copy)."""
    if use_raw:
        return ad.AnnData(adata.raw.X, obs=adata.obs, var=adata.raw.var)
    return ad.AnnData(adata.X if layer is None else adata.layers[layer], obs=adata.obs, var=adata.var)
