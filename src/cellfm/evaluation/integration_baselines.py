"""The integration methods CellFM is compared against, each through the library users run.

- HVG+PCA of the uncorrected data (`baselines.HvgPca`, scanpy's recipe): the "no integration"
  reference every scIB table carries;
- Harmony (`harmonypy`) on that PCA;
- scVI (`scvi-tools`) trained on the raw counts of the HVGs with the batch as covariate, a short
  CPU run (few epochs; scvi-tools' own heuristic for a few thousand cells is 400).
Each one runs when its package is installed (`pip install cellfm[eval]`) and is otherwise reported
as not run, with the reason; an optional method that fails is reported, never fatal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anndata as ad
import numpy as np

from cellfm.evaluation.baselines import HvgPca
from cellfm.extras import installed_version

log = logging.getLogger(__name__)


@dataclass
class BaselineRun:
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (N, d)
    notes: dict[str, str] = field(default_factory=dict)  # method -> what ran, or why not


def integration_baselines(
    adata: ad.AnnData,
    batch_key: str,
    *,
    harmony: bool = True,
    scvi_epochs: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> BaselineRun:
    """HVG+PCA always; Harmony and scVI (`scvi_epochs` > 0) when installed. Raw counts in X."""
    run = BaselineRun()
    hp = HvgPca(seed=seed).fit(adata.X)
    run.embeddings["HVG+PCA"] = hp.transform(adata.X)
    run.notes["HVG+PCA"] = f"{len(hp.genes_)} HVGs, {hp.components_.shape[0]} PCs, {hp.backend_}"
    if harmony:
        version = installed_version("harmonypy")
        if version is None:
            run.notes["Harmony"] = "not run: harmonypy not installed"
        else:
            note = f"harmonypy {version} on the HVG+PCA"
            _try(run, "Harmony", note, lambda: _harmony(run, adata, batch_key, seed))
    if scvi_epochs > 0:
        version = installed_version("scvi-tools")
        if version is None:
            run.notes["scVI"] = "not run: scvi-tools not installed"
        else:
            _try(
                run,
                "scVI",
                f"scvi-tools {version}, {scvi_epochs} epochs on CPU, {len(hp.genes_)} HVG counts",
                lambda: _scvi(adata[:, hp.genes_], batch_key, scvi_epochs, seed, progress),
            )
    return run


def _try(run: BaselineRun, name: str, note: str, fn) -> None:
    try:
        run.embeddings[name] = np.asarray(fn(), dtype=np.float32)
        run.notes[name] = note
    except Exception as err:  # an optional baseline must never break the evaluation
        log.warning("%s failed: %s", name, err)
        run.notes[name] = f"failed: {type(err).__name__}: {err}"


def _harmony(run: BaselineRun, adata: ad.AnnData, batch_key: str, seed: int) -> np.ndarray:
    import harmonypy

    pca = run.embeddings["HVG+PCA"].astype(np.float64)
    ho = harmonypy.run_harmony(pca, adata.obs, batch_key, random_state=seed, verbose=False)
    Z = np.asarray(ho.Z_corr)
    return Z if Z.shape[0] == adata.n_obs else Z.T  # harmonypy < 2 returns (d, N)


def _scvi(adata: ad.AnnData, batch_key: str, epochs: int, seed: int, progress: bool) -> np.ndarray:
    import scipy.sparse as sp
    import scvi

    scvi.settings.seed = seed
    a = ad.AnnData(
        X=sp.csr_matrix(adata.X, dtype=np.float32), obs=adata.obs[[batch_key]].astype(str).astype("category")
    )
    scvi.model.SCVI.setup_anndata(a, batch_key=batch_key)
    model = scvi.model.SCVI(a)
    model.train(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=progress)
    return model.get_latent_representation()  # (N, 10)
