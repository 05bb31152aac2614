"""Count files in: `read_cells` reads .h5ad with anndata and 10x matrix folders, 10x .h5 and
.loom with the format readers (`cellfm.io.readers`), so `cellfm embed`, every task and `corpus
build` agree on formats; `open_rows` gives a file's counts by row slices without reading them.
Nothing here judges counts (`cellfm.contract` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cellfm.io.corpus import is_corpus
from cellfm.io.readers import open_source

if TYPE_CHECKING:
    import anndata as ad

FORMATS = ".h5ad, a 10x matrix folder (matrix.mtx[.gz]), a 10x .h5 or a .loom"


def input_format(path: Path) -> str | None:
    """"h5ad", "10x_mtx", "10x_h5", "loom", "corpus" (a folder from `cellfm corpus build`), or None
    for a format cellfm does not read."""
    name = path.name.lower()
    if path.is_dir():
        return "corpus" if is_corpus(path) else "10x_mtx"
    for suffix, fmt in ((".h5ad", "h5ad"), (".h5", "10x_h5"), (".loom", "loom")):
        if name.endswith(suffix):
            return fmt
    return None


def read_cells(path: str | Path, *, backed: bool = False) -> ad.AnnData:
    """Read a count file into an AnnData (cells x genes). `backed` applies to .h5ad only.

    For 10x and loom files the var names are the gene symbols, or the gene ids (Ensembl) when the
    symbols repeat; both are kept in `var` ("gene_symbols", "gene_ids").
    """
    import anndata as ad

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    fmt = input_format(path)
    if fmt is None:
        raise ValueError(f"{path.name} is not a format cellfm reads ({FORMATS}); convert it to .h5ad "
                         "first, e.g. with scanpy.read_csv(...).write_h5ad(...)")
    if fmt == "corpus":
        raise ValueError(f"{path} is a corpus folder (`cellfm corpus build`), not a count file: embed it "
                         "with `cellfm embed CORPUS -o OUT.parquet` or `cellfm.embed_file`")
    try:
        if fmt == "h5ad":
            return ad.read_h5ad(path, backed="r" if backed else None)
        return _from_source(path)
    except (OSError, KeyError, ValueError, StopIteration, EOFError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not read {path} as {fmt} ({reason}): is the file complete and "
                         "not truncated?") from None


def _from_source(path: Path) -> ad.AnnData:
    import anndata as ad
    import scipy.sparse as sp

    src = open_source(path)
    blocks = [m for _, m in src.chunks(8192)]
    X = sp.vstack(blocks).tocsr() if blocks else sp.csr_matrix((0, len(src.var_names)))
    cells = _cells_of(src)
    return ad.AnnData(X=X, obs=cells.obs, var=cells.var)


def open_rows(path: str | Path) -> tuple[ad.AnnData, SourceRows]:
    """A 10x folder / .h5 or .loom as (AnnData of obs and var only, its counts by row slices):
    the same names as `read_cells`, without reading the matrix."""
    try:
        src = open_source(Path(path))
    except (OSError, KeyError, ValueError, StopIteration, EOFError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not read {path} ({reason}): is the file complete and not "
                         "truncated?") from None
    return _cells_of(src), SourceRows(src)


class SourceRows:
    """The counts of a corpus `CountSource` as a matrix sliced by rows (`rows[a:b]` -> CSR).
    Formats with a row index (10x .h5, loom) read just those rows; the others are read forward
    one chunk at a time, and asking for rows before the current chunk starts the file again.
    Passes over the file in row order (checks, embedding) hold one chunk in memory."""

    def __init__(self, source, chunk_size: int = 4096):
        self.source, self.chunk_size = source, chunk_size
        self.shape = (source.n_cells, len(source.var_names))
        self._chunks, self._start, self._block = None, 0, self._empty()

    def _empty(self):
        import scipy.sparse as sp

        return sp.csr_matrix((0, len(self.source.var_names)), dtype=np.float32)

    def __getitem__(self, key: slice):
        import scipy.sparse as sp

        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("SourceRows supports row slices a:b only")
        a, b, _ = key.indices(self.shape[0])
        if self.source.rows is not None:
            return sp.csr_matrix(self.source.rows(a, max(a, b)), dtype=np.float32)
        if self._chunks is None or a < self._start:
            self._chunks, self._start, self._block = self.source.chunks(self.chunk_size), 0, self._empty()
        parts = []
        while True:
            end = self._start + self._block.shape[0]
            lo, hi = max(a, self._start), min(b, end)
            if lo < hi:
                parts.append(self._block[lo - self._start : hi - self._start])
            if b <= end:
                break
            self._start, block = next(self._chunks)
            self._block = sp.csr_matrix(block)
        return sp.vstack(parts, format="csr") if parts else self._empty()


def _cells_of(src) -> ad.AnnData:
    """obs and var (no X) of a CountSource, named as `read_cells` names them."""
    import anndata as ad
    import pandas as pd

    symbols = pd.Index(np.asarray(src.var_names, dtype=str))
    var = pd.DataFrame({"gene_symbols": symbols})
    if src.var_ids is not None:
        var["gene_ids"] = np.asarray(src.var_ids, dtype=str)
    names = symbols
    if not symbols.is_unique and "gene_ids" in var and var["gene_ids"].is_unique:
        names = pd.Index(var["gene_ids"])
    var.index = names
    obs = src.obs.copy() if len(src.obs.columns) else pd.DataFrame(index=range(src.n_cells))
    obs.index = pd.Index(np.asarray(src.cell_ids, dtype=str))
    return ad.AnnData(obs=obs, var=var)
