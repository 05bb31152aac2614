"""The corpus builder's three needs from `cellfm.vocab`, in one place: load a vocabulary by name,
map identifiers to token ids (0 = not in the vocabulary), and describe it (name, size, hash) for
the manifest. Gene mapping itself lives in `cellfm.vocab`; nothing here second-guesses it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import pandas as pd

from cellfm.vocab import GeneVocabulary, map_genes
from cellfm.vocab import load_vocabulary as load_vocabulary_by_name


def load_vocabulary(vocab: object) -> object:
    """A vocabulary object from a built-in name (or the object itself)."""
    if not isinstance(vocab, str):
        return vocab
    return _load_named(vocab)


@lru_cache(maxsize=4)
def _load_named(name: str) -> GeneVocabulary:
    return load_vocabulary_by_name(name)


def token_ids_for(names: Sequence[str], vocabulary: object) -> np.ndarray:
    """(n,) int64 token id per identifier, 0 where it is not in the vocabulary."""
    try:
        with warnings.catch_warnings():  # restricted panels are reported per file, not warned
            warnings.simplefilter("ignore")
            mapping = map_genes(pd.Index([str(n) for n in names]), vocabulary)
    except ValueError:  # too few matches: the builder decides what that means for the file
        return np.zeros(len(names), np.int64)
    for attr in ("token_ids", "ids", "gene_ids"):
        if hasattr(mapping, attr):
            return np.asarray(getattr(mapping, attr), dtype=np.int64)
    return np.asarray(mapping, dtype=np.int64)


def vocabulary_genes(vocabulary: object) -> list[str]:
    for attr in ("genes", "symbols", "gene_names"):
        if hasattr(vocabulary, attr):
            return [str(g) for g in getattr(vocabulary, attr)]
    raise AttributeError(f"{type(vocabulary).__name__} lists no genes")


def describe_vocabulary(vocabulary: object) -> dict:
    """{"name", "n_genes", "sha256"}: the vocabulary's own hash (the one a saved model records)
    when it has one, else a hash of the gene list in token order; a corpus and a model agree on
    ids exactly when their hashes agree."""
    genes = vocabulary_genes(vocabulary)
    digest = getattr(vocabulary, "sha256", None) or hashlib.sha256("\n".join(genes).encode()).hexdigest()
    return {"name": str(getattr(vocabulary, "name", "custom")), "n_genes": len(genes), "sha256": digest}
