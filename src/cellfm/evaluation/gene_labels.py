"""Readers for the gene-level label sources of the evaluation data folder (`data.data_file`).

- Geneformer's binary gene classification tasks (long TSV: task, ensembl_id, label, symbol);
- GO annotations from org.Hs.eg.db (entrez, symbol, go_id, evidence, ontology), with term names;
- MSigDB-format GMT gene sets (Reactome pathways).
Only reading and filtering; no model code.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd

from cellfm.evaluation.data import data_file

GENEFORMER_TASKS = "gene_function_labels/geneformer_tasks/geneformer_gene_tasks_long.tsv"
GO_PROPAGATED = "go_annotations_org_hs_eg_db/go_annotations_propagated.tsv.gz"
GO_DIRECT = "go_annotations_org_hs_eg_db/go_annotations_direct.tsv.gz"
GO_TERMS = "go_annotations_org_hs_eg_db/go_terms.tsv.gz"
REACTOME_GMT = "gene_function_labels/gene_sets/msigdb_c2_cp_reactome_v6.2_symbols.gmt.gz"


def load_geneformer_tasks(data_dir: str | Path | None = None) -> pd.DataFrame:
    """Columns task, ensembl_id, label, symbol (symbol may be empty)."""
    df = pd.read_csv(data_file(data_dir, GENEFORMER_TASKS), sep="\t", dtype=str)
    missing = {"task", "ensembl_id", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{GENEFORMER_TASKS} lacks columns {sorted(missing)}")
    return df.fillna({"symbol": ""})


def load_go_annotations(
    data_dir: str | Path | None = None, ontology: str | None = None, propagated: bool = True
) -> pd.DataFrame:
    """GO annotations (symbol, go_id, ontology), all evidence codes; one row per (gene, term).

    `propagated`: each term also given to the genes of its descendants (org.Hs.eg.db `go_*_all`);
    else only the direct annotations (as the CellFM gene-function data set counts terms).
    """
    df = pd.read_csv(
        data_file(data_dir, GO_PROPAGATED if propagated else GO_DIRECT),
        sep="\t",
        usecols=["symbol", "go_id", "ontology"],
        dtype=str,
    )
    if ontology is not None:
        df = df[df["ontology"] == ontology]
    return df.drop_duplicates(["symbol", "go_id"]).reset_index(drop=True)


def load_go_term_names(data_dir: str | Path | None = None) -> pd.Series:
    df = pd.read_csv(data_file(data_dir, GO_TERMS), sep="\t", usecols=["go_id", "term"], dtype=str)
    return df.set_index("go_id")["term"]


def load_gmt(data_dir: str | Path | None = None, rel: str = REACTOME_GMT) -> dict[str, set[str]]:
    """Gene set name -> set of symbols."""
    p = data_file(data_dir, rel)
    opener = gzip.open if p.suffix == ".gz" else open
    sets = {}
    with opener(p, "rt") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) > 2:
                sets[parts[0]] = {g for g in parts[2:] if g}
    return sets


def annotation_sets(
    df: pd.DataFrame,
    gene_col: str = "symbol",
    term_col: str = "go_id",
    min_size: int = 5,
    max_size: int = 500,
) -> dict[str, set[str]]:
    """Term -> genes, keeping terms of moderate size (huge terms make every pair 'share' one)."""
    sizes = df.groupby(term_col)[gene_col].nunique()
    keep = sizes[(sizes >= min_size) & (sizes <= max_size)].index
    sub = df[df[term_col].isin(keep)]
    return {t: set(g) for t, g in sub.groupby(term_col)[gene_col]}
