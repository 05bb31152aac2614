"""Cross-data-set annotation on shared coarse cell types: fit on one data set, label another.

The data sets name their types in free text ("CD14+ Mono", "MNP", "CD4+/CD25 T Reg"), which no
rule maps to ontology terms, so each label is given its Cell Ontology term here by hand
(`LABEL_TO_CL`). The coarse type is then read from the ontology itself: the first of `COARSE`
(B cell, CD4 / CD8 alpha-beta T cell, NK cell, mononuclear phagocyte) that is the term or one of
its ancestors in the CL snapshot `cell_ontology_cellxgene/` of the data folder. A label with no
coarse ancestor (platelet, haematopoietic stem cell) is left out of both sides.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from cellfm.cellfm import CellFM
from cellfm.tasks.annotation.annotator import CellTypeAnnotator
from cellfm.tasks.annotation.config import AnnotatorConfig
from cellfm.tasks.annotation.evaluate import compare_on_query

ONTOLOGY_FILE = "cell_ontology_cellxgene/CL-ontology-v2026-03-26.json.zst"
COARSE = {  # CL id -> coarse type, the order in which they are tried
    "CL:0000236": "B cell",
    "CL:0000624": "CD4 T cell",
    "CL:0000625": "CD8 T cell",
    "CL:0000623": "NK cell",
    "CL:0000113": "mononuclear phagocyte",
}
LABEL_TO_CL = {
    # pbmc3k (Seurat tutorial labels, clustifyr)
    "Naive CD4 T": "CL:0000895", "Memory CD4 T": "CL:0000897", "CD8 T": "CL:0000625", "B": "CL:0000236",
    "NK": "CL:0000623", "CD14+ Mono": "CL:0001054", "FCGR3A+ Mono": "CL:0002396", "DC": "CL:0000451",
    "Platelet": "CL:0000233",
    # pbmc4k (SoupX tutorial clusters)
    "T_CD4": "CL:0000624", "T_CD8": "CL:0000625", "MNP": "CL:0000113",
    # pbmc68k_reduced (bulk_labels: sorted populations)
    "CD19+ B": "CL:0000236", "CD14+ Monocyte": "CL:0001054", "Dendritic": "CL:0000451",
    "CD56+ NK": "CL:0000623", "CD8+ Cytotoxic T": "CL:0000794", "CD8+/CD45RA+ Naive Cytotoxic": "CL:0000900",
    "CD4+/CD25 T Reg": "CL:0000792", "CD4+/CD45RO+ Memory": "CL:0000897",
    "CD4+/CD45RA+/CD25- Naive T": "CL:0000895", "CD34+": "CL:0000037",
}


def read_ontology(data_dir: str | Path) -> dict[str, dict]:
    """The CL snapshot {id: {label, ancestors{id: distance}, ...}} (zstd JSON; the `zstandard`
    package when installed, else the `zstd` program)."""
    path = Path(data_dir) / ONTOLOGY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the Cell Ontology snapshot of the data folder")
    try:
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read()
    except ImportError:
        if shutil.which("zstd") is None:
            raise RuntimeError(f"reading {path} needs the zstandard package (pip install zstandard) or "
                               "the zstd program") from None
        raw = subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return json.loads(raw)


def coarse_type(cl_id: str, ontology: dict[str, dict]) -> str | None:
    """The coarse type of a CL term: the first of `COARSE` that is the term or its ancestor."""
    ancestors = ontology.get(cl_id, {}).get("ancestors", {})
    return next((name for c, name in COARSE.items() if c == cl_id or c in ancestors), None)


def coarse_labels(labels: pd.Series, ontology: dict[str, dict]) -> pd.Series:
    """Free-text labels -> coarse types (NaN: no CL term in `LABEL_TO_CL`, or no coarse ancestor)."""
    table = {lab: coarse_type(cl, ontology) for lab, cl in LABEL_TO_CL.items()}
    return labels.astype(str).map(table).astype(object)


@dataclass
class CrossDatasetResult:
    """`table`: the annotator and both baselines on the query (`compare_on_query` columns);
    `unknown_share`: of the query cells; `n_query`: query cells of the reference's coarse types."""

    table: pd.DataFrame
    unknown_share: float
    unknown_by_class: dict
    n_reference: int
    n_query: int
    head: str


def coarse_copy(adata: ad.AnnData, key: str, ontology: dict[str, dict], key_added: str = "coarse_type"
                ) -> ad.AnnData:
    """The cells of `adata` that have a coarse type, with it in `obs[key_added]`."""
    coarse = coarse_labels(adata.obs[key], ontology)
    keep = coarse.notna().to_numpy()
    out = adata[keep].copy()
    out.obs[key_added] = coarse[keep].to_numpy()
    return out


def annotate_across(
    reference: ad.AnnData, reference_key: str, queries: dict[str, tuple[ad.AnnData, str]],
    model: CellFM | str, ontology: dict[str, dict], config: AnnotatorConfig | None = None,
) -> dict[str, CrossDatasetResult]:
    """Fit once on the coarse types of `reference`; for each query {name: (adata, label key)}
    label its cells of those types and score them against their own coarse types, beside both
    baselines fitted on the reference (the PCA one on the genes both data sets measure)."""
    ref = coarse_copy(reference, reference_key, ontology)
    ann = CellTypeAnnotator(model, config).fit(ref, "coarse_type")
    out = {}
    for name, (query, key) in queries.items():
        q = coarse_copy(query, key, ontology)
        q = q[np.isin(q.obs["coarse_type"].to_numpy(), ann.classes)].copy()
        ann.predict(q)
        uns = q.uns["cellfm_annotation"]
        by_class = uns["rejected_fraction_by_predicted_class"]
        out[name] = CrossDatasetResult(
            compare_on_query(ann, ref, q, "coarse_type"), uns["rejected_fraction"],
            dict(zip(by_class["classes"], by_class["rejected_fraction"], strict=True)), ref.n_obs, q.n_obs,
            ann.settings["head"])
    return out
