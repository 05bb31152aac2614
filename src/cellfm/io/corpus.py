"""A corpus folder (`cellfm corpus build`) read as one cells x genes matrix sliced by rows.

Row i is global cell i of the manifest (shards in order); column j is vocabulary token id j + 1;
values are the library-scaled counts the shards store. `matrix[a:b]` opens only the shards that
rows a:b touch (memory-mapped, `ShardReader`), so a process reading its own row range never
touches the others' pages. Cell names are read only when asked for. Nothing here tokenizes.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellfm.corpus.manifest import MANIFEST_NAME, CorpusManifest
from cellfm.corpus.shards import ShardReader


def is_corpus(path: str | Path) -> bool:
    """A folder holding a corpus manifest."""
    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).is_file()


class CorpusMatrix:
    """`CorpusMatrix(folder)[a:b]` -> CSR (b - a, n_genes) float32 of scaled counts."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = CorpusManifest.load(self.folder)
        sizes = [s.n_cells for s in self.manifest.shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (n_shards + 1,)
        self.shape = (int(self.starts[-1]), int(self.manifest.vocabulary["n_genes"]))
        self._readers: dict[int, ShardReader] = {}

    def _reader(self, s: int) -> ShardReader:
        if s not in self._readers:
            self._readers[s] = ShardReader(self.folder / self.manifest.shards[s].file)
        return self._readers[s]

    def _shards(self, a: int, b: int):
        """(shard, first local row, end local row) of the shards that rows a:b touch."""
        for s in range(len(self.manifest.shards)):
            lo, hi = max(a, self.starts[s]), min(b, self.starts[s + 1])
            if lo < hi:
                yield s, int(lo - self.starts[s]), int(hi - self.starts[s])

    def __getitem__(self, key: slice) -> sp.csr_matrix:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("CorpusMatrix supports row slices a:b only")
        a, b, _ = key.indices(self.shape[0])
        b = max(a, b)
        parts = []
        for s, lo, hi in self._shards(a, b):
            indptr, ids, counts = self._reader(s).take(np.arange(lo, hi))
            parts.append(sp.csr_matrix((counts.astype(np.float32), ids.astype(np.int32) - 1, indptr),
                                       shape=(hi - lo, self.shape[1])))
        if not parts:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        return sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]

    @cached_property
    def obs_names(self) -> pd.Index:
        """The cells' ids; where ids repeat across inputs, "<input file name>:<id>" (then made
        unique by anndata's suffixes, should one input repeat an id)."""
        import anndata as ad

        ids, inputs = [], []
        for s, info in enumerate(self.manifest.shards):
            cells = self._reader(s).column("cell_id").to_numpy(zero_copy_only=False).astype(str)
            ids.append(cells)
            inputs.append(np.full(len(cells), Path(info.source).name, dtype=object))
        names = pd.Index(np.concatenate(ids) if ids else np.zeros(0, str), dtype=str)
        if not names.is_unique:
            names = pd.Index([f"{f}:{c}" for f, c in zip(np.concatenate(inputs), names, strict=True)])
        if not names.is_unique:
            names = ad.utils.make_index_unique(names)
        return names
