"""`GeneVocabulary`: the ordered gene list a model's gene-embedding table refers to.

Token id = position + 1; id 0 is padding. Built-ins are the official CellFM lists, read verbatim
from the packaged CSVs (their first column, in row order, as the official code reads them).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).parent / "data"
BUILTIN = {
    "cellfm-24k": DATA / "cellfm_gene_info.csv",  # 24,078 genes, the 800M model
    "cellfm-27k": DATA / "cellfm_expand_gene_info.csv",  # 27,855 genes, the 80M model
}


class GeneVocabulary:
    def __init__(self, genes: list[str], name: str = "custom") -> None:
        self.genes = [str(g) for g in genes]
        self.name = name
        self._ids = {g: i + 1 for i, g in enumerate(self.genes)}
        if len(self._ids) != len(self.genes):
            raise ValueError(f"vocabulary {name!r} lists some genes twice")

    def __len__(self) -> int:
        return len(self.genes)

    def __contains__(self, gene: str) -> bool:
        return gene in self._ids

    def id_of(self, gene: str) -> int:
        """Token id of `gene`, 0 if absent."""
        return self._ids.get(gene, 0)

    @property
    def symbols(self) -> list[str]:
        return self.genes

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.genes).encode()).hexdigest()

    def to_file(self, path: str | Path) -> None:
        Path(path).write_text("\n".join(self.genes) + "\n")

    @classmethod
    def from_file(cls, path: str | Path, name: str = "custom") -> GeneVocabulary:
        return cls([g for g in Path(path).read_text().splitlines() if g], name=name)

    def __repr__(self) -> str:
        return f"GeneVocabulary({self.name!r}, {len(self)} genes)"


@lru_cache(maxsize=4)
def load_vocabulary(name: str) -> GeneVocabulary:
    """A built-in vocabulary: "cellfm-24k" (800M model) or "cellfm-27k" (80M model)."""
    if name not in BUILTIN:
        raise KeyError(f"unknown vocabulary {name!r}; built-in: {sorted(BUILTIN)}")
    with open(BUILTIN[name]) as f:
        next(f)  # header
        genes = [line.split(",", 1)[0] for line in f if line.strip()]
    return GeneVocabulary(genes, name=name)
