"""The Gene Ontology gene graph GEARS uses, built offline from local GO annotations.

GEARS links perturbable genes by the Jaccard index of their GO term sets, keeps an edge when it is
above 0.1 and, per gene, its `k + 1` strongest neighbours (itself included). Its package downloads
`gene2go_all.pkl` (gene symbol -> set of GO ids, NCBI gene2go) and a precomputed edge list; here
both come from org.Hs.eg.db's direct annotations (`../shared/data/go_annotations_org_hs_eg_db`,
the same NCBI source), so nothing is fetched at run time.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

GO_ROOTS = {"GO:0008150", "GO:0005575", "GO:0003674"}  # BP, CC, MF roots ("no data" annotations)
ANNOTATION_FILE = "go_annotations_direct.tsv.gz"
GENES_FILE = "genes.tsv.gz"


def load_gene2go(go_dir: str | Path, ontologies: Iterable[str] = ("BP", "CC", "MF")) -> dict[str, set[str]]:
    """gene symbol -> set of directly annotated GO ids (evidence ND and root terms dropped: they
    would make every unstudied gene similar to every other)."""
    path = Path(go_dir) / ANNOTATION_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the GO graph is built from the org.Hs.eg.db annotations in the "
            "go_annotations_org_hs_eg_db data folder; its SOURCE.md and the README section "
            "'Test data' say how to get it"
        )
    table = pd.read_csv(path, sep="\t", usecols=["symbol", "go_id", "evidence", "ontology"])
    keep = table.ontology.isin(list(ontologies)) & (table.evidence != "ND") & ~table.go_id.isin(GO_ROOTS)
    gene2go: dict[str, set[str]] = {}
    for symbol, go_id in zip(table.symbol[keep], table.go_id[keep], strict=True):
        gene2go.setdefault(symbol, set()).add(go_id)
    # screens name genes by the symbol of their day (MARCH8, now MARCHF8): an alias that belongs to
    # exactly one gene and is no gene's current symbol gets that gene's terms
    genes_path = Path(go_dir) / GENES_FILE
    if genes_path.exists():
        genes = pd.read_csv(genes_path, sep="\t", usecols=["symbol", "alias_symbols"]).dropna()
        current = set(genes.symbol)
        owners: dict[str, set[str]] = {}
        for symbol, aliases in zip(genes.symbol, genes.alias_symbols, strict=True):
            for alias in aliases.split(";"):
                owners.setdefault(alias, set()).add(symbol)
        for alias, symbols in owners.items():
            if len(symbols) == 1 and alias not in current and next(iter(symbols)) in gene2go:
                gene2go[alias] = gene2go[next(iter(symbols))]
    return gene2go


def go_similarity_edges(
    genes: Iterable[str], gene2go: dict[str, set[str]], k: int = 20, threshold: float = 0.1
) -> pd.DataFrame:
    """Edges (source, target, importance = Jaccard) between annotated `genes`: Jaccard > threshold,
    then the k + 1 largest per target, GEARS' rule (a gene is its own best neighbour)."""
    genes = [g for g in dict.fromkeys(genes) if g in gene2go]
    if not genes:
        return pd.DataFrame(columns=["source", "target", "importance"])
    terms = sorted(set().union(*(gene2go[g] for g in genes)))
    col = {t: j for j, t in enumerate(terms)}
    A = np.zeros((len(genes), len(terms)), dtype=np.float32)  # genes x terms, 0/1
    for i, g in enumerate(genes):
        A[i, [col[t] for t in gene2go[g]]] = 1.0
    inter = A @ A.T  # (n, n) shared terms
    sizes = A.sum(1)
    jaccard = inter / (sizes[:, None] + sizes[None, :] - inter)
    rows = []
    for t in range(len(genes)):
        s = jaccard[:, t]
        cand = np.flatnonzero(s > threshold)
        cand = cand[np.argsort(-s[cand], kind="stable")][: k + 1]
        rows += [(genes[i], genes[t], float(s[i])) for i in cand]
    return pd.DataFrame(rows, columns=["source", "target", "importance"])


def write_gears_go_file(data_path: str | Path, gene2go: dict[str, set[str]]) -> Path:
    """Write `gene2go_all.pkl` where GEARS' `PertData` looks before downloading it."""
    path = Path(data_path) / "gene2go_all.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pkl.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(gene2go, f)
    tmp.replace(path)
    return path
