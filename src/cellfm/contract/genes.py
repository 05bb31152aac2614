"""Which column of the input is which vocabulary gene: gene names, the duplicate check, the match
onto the model's vocabulary, and the refusal of mouse symbols. Every error names the argument
(or CLI flag) that fixes it (`cellfm.wording`). Nothing here reads counts.
"""

from __future__ import annotations

import warnings

import anndata as ad
import pandas as pd

from cellfm.contract.counts import mouse_case_fraction
from cellfm.vocab import GeneMapping, GeneVocabulary, map_genes
from cellfm.wording import arg, in_cli


def gene_names(adata: ad.AnnData, gene_key: str | None) -> pd.Index:
    """The identifiers of adata's genes: `adata.var[gene_key]`, or the var names."""
    if gene_key is None:
        return pd.Index(adata.var_names.astype(str))
    if gene_key not in adata.var.columns:
        default = "leave out --gene-key" if in_cli() else "leave gene_key=None"
        raise KeyError(
            f"{arg('gene_key', gene_key)} is not a column of adata.var (columns: {list(adata.var.columns)}); "
            f"{default} to use the var names"
        )
    return pd.Index(adata.var[gene_key].astype(str))


def refuse_duplicate_genes(names: pd.Index, gene_key: str | None) -> None:
    """Duplicated gene names would be resolved silently (first column wins): refuse them instead."""
    dup = names[names.duplicated()].unique()
    if len(dup):
        where = f"adata.var[{gene_key!r}]" if gene_key else "the var names"
        raise ValueError(
            f"{len(dup)} gene names occur more than once in {where} (e.g. {list(dup[:3])}), so it is "
            f"ambiguous which column to use: sum the duplicated genes, or pass "
            f"{arg('gene_key', placeholder='column')} naming a column of unique gene ids (e.g. Ensembl)"
        )


def match_genes(names: pd.Index, vocab: GeneVocabulary) -> GeneMapping:
    """`map_genes` onto `vocab`, refusing inputs where nothing matches and mouse-case symbols
    (Cd3e) that would otherwise match human genes only by ignoring case."""
    with warnings.catch_warnings():  # the panel warning is re-issued below only when genes match
        warnings.simplefilter("ignore")
        mapping = map_genes(names, vocab, min_genes=0)
    if mapping.n_matched == 0:
        example = ", ".join(repr(g) for g in names[:5])
        mouse = " (these look like mouse symbols)" if mouse_case_fraction(names[:200]) > 0.5 else ""
        raise ValueError(
            f"none of the {len(names)} genes (e.g. {example}){mouse} match the model's vocabulary "
            f"{vocab.name!r}: use human HGNC symbols or Ensembl gene ids (if they are in a column "
            f"of adata.var, pass {arg('gene_key', placeholder='column')}); map mouse genes to human "
            "orthologs first"
        )
    if len(names) >= 200 and mapping.n_matched < 1000:
        warnings.warn(f"{mapping}: a restricted gene panel gives a less informed embedding", stacklevel=4)
    matched = mapping.how[mapping.token_ids > 0]
    if (matched == "case").mean() > 0.5:
        example = ", ".join(repr(g) for g in mapping.names[mapping.how == "case"][:5])
        raise ValueError(
            f"{(matched == 'case').sum()} of {len(matched)} matched genes match the human vocabulary "
            f"only when case is ignored (e.g. {example}): these look like mouse gene symbols. Map "
            "them to human orthologs first (or fix the case if the data are human)."
        )
    return mapping
