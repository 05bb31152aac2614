"""Map a dataset's gene identifiers to vocabulary token ids, and say what happened to each.

Order of evidence: the exact symbol; the symbol ignoring case; an Ensembl id (versioned or
not) through GENCODE v44 / Ensembl 109 / HGNC; an HGNC previous symbol; an HGNC alias. A
remapped identifier is used only when it points to exactly one vocabulary gene that no other
column already claims, so a rename never overwrites a gene that is present under its own name.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from cellfm.vocab.vocabulary import DATA, GeneVocabulary

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


@lru_cache(maxsize=1)
def _alias_table() -> dict[str, dict[str, set[str]]]:
    """{kind: {identifier (upper case for symbols): {approved symbols}}}"""
    t = pd.read_csv(DATA / "gene_aliases.tsv.gz", sep="\t", dtype=str).dropna()
    out: dict[str, dict[str, set[str]]] = {"ensembl": {}, "previous": {}, "alias": {}}
    for ident, sym, kind in zip(t["identifier"], t["symbol"], t["kind"], strict=True):
        key = ident if kind == "ensembl" else ident.upper()
        out[kind].setdefault(key, set()).add(sym)
    return out


@dataclass
class GeneMapping:
    """Per input column: `token_ids` (0 = dropped) and `how` it matched."""

    names: np.ndarray  # (n_vars,) input identifiers
    token_ids: np.ndarray  # (n_vars,) int64
    how: np.ndarray  # (n_vars,) exact | case | ensembl | previous | alias | duplicate | dropped
    vocab_name: str

    @property
    def n_matched(self) -> int:
        return int((self.token_ids > 0).sum())

    @property
    def n_remapped(self) -> int:
        return int(np.isin(self.how, ["case", "ensembl", "previous", "alias"]).sum())

    def report(self) -> pd.DataFrame:
        """One row per input gene: identifier, token id, vocabulary symbol, how."""
        return pd.DataFrame({"identifier": self.names, "token_id": self.token_ids, "how": self.how})

    def summary(self) -> dict[str, int]:
        counts = pd.Series(self.how).value_counts()
        return {"n_input": len(self.names), "n_matched": self.n_matched,
                "n_remapped": self.n_remapped, **{f"n_{k}": int(v) for k, v in counts.items()}}

    def __str__(self) -> str:
        s = self.summary()
        return (f"{s['n_matched']} of {s['n_input']} genes matched vocabulary {self.vocab_name!r} "
                f"({s['n_remapped']} remapped via case/Ensembl/previous/alias), "
                f"{s['n_input'] - s['n_matched']} dropped")


def map_genes(var_names, vocab: GeneVocabulary, *, min_genes: int = 1) -> GeneMapping:
    """Map identifiers (symbols, Ensembl ids, old symbols) to `vocab` token ids.

    Raises ValueError when fewer than `min_genes` match (wrong species or identifier column);
    warns when a dataset (>= 200 identifiers) matches fewer than 1,000 (a restricted panel gives a
    less informed embedding).
    """
    names = np.asarray([str(n).strip() for n in var_names], dtype=object)
    n = len(names)
    ids = np.zeros(n, dtype=np.int64)
    how = np.full(n, "dropped", dtype=object)
    claimed: set[int] = set()

    def assign(i: int, token: int, kind: str) -> None:
        if token in claimed:
            how[i] = "duplicate"
            return
        ids[i], how[i] = token, kind
        claimed.add(token)

    for i, g in enumerate(names):  # exact symbols first: they win over any rename
        t = vocab.id_of(g)
        if t:
            assign(i, t, "exact")
    upper = {g.upper(): vocab.id_of(g) for g in vocab.genes}
    tables = None
    for i, g in enumerate(names):
        if how[i] != "dropped":
            continue
        candidates: list[tuple[set[int], str]] = []
        if g.upper() in upper:
            candidates.append(({upper[g.upper()]}, "case"))
        if tables is None:
            tables = _alias_table()
        if _ENSEMBL.match(g):
            syms = tables["ensembl"].get(g.split(".")[0], set())
            candidates.append(({vocab.id_of(s) for s in syms} - {0}, "ensembl"))
        for kind in ("previous", "alias"):
            syms = tables[kind].get(g.upper(), set())
            candidates.append(({vocab.id_of(s) for s in syms} - {0}, kind))
        for tokens, kind in candidates:
            if len(tokens) == 1:
                assign(i, next(iter(tokens)), kind)
                break
    mapping = GeneMapping(names, ids, how, vocab.name)
    if mapping.n_matched < min_genes:
        example = ", ".join(repr(g) for g in names[:5])
        raise ValueError(
            f"{'none' if mapping.n_matched == 0 else f'only {mapping.n_matched}'} of the {n} genes "
            f"(e.g. {example}) match vocabulary {vocab.name!r}. "
            "Use human HGNC symbols or Ensembl gene ids; if they are in a column of adata.var pass "
            "gene_key=<column>; mouse genes must be mapped to human orthologs first."
        )
    if n >= 200 and mapping.n_matched < 1000:
        warnings.warn(f"{mapping}: a restricted gene panel gives a less informed embedding", stacklevel=2)
    return mapping
