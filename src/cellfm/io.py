"""Files at the edges of the embed path: count files in, results out.

`read_cells` reads .h5ad with anndata and 10x matrix folders, 10x .h5 and .loom with the corpus
readers (`cellfm.corpus.readers`), so `cellfm embed` and `corpus build` agree on formats.
`write_h5ad` / `write_embedding` write to a hidden temporary name in the target folder and
rename it into place, so an interrupted run never leaves a complete-looking but partial output;
they refuse to replace an existing file unless `overwrite=True`. Nothing here judges counts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import anndata as ad

FORMATS = ".h5ad, a 10x matrix folder (matrix.mtx[.gz]), a 10x .h5 or a .loom"


def input_format(path: Path) -> str | None:
    """"h5ad", "10x_mtx", "10x_h5", "loom", "corpus" (a folder from `cellfm corpus build`), or None
    for a format cellfm does not read."""
    from cellfm.corpus.matrix import is_corpus

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

    from cellfm.corpus.readers import open_source

    src = open_source(path)
    blocks = [m for _, m in src.chunks(8192)]
    X = sp.vstack(blocks).tocsr() if blocks else sp.csr_matrix((0, len(src.var_names)))
    cells = _cells_of(src)
    return ad.AnnData(X=X, obs=cells.obs, var=cells.var)


def open_rows(path: str | Path) -> tuple[ad.AnnData, SourceRows]:
    """A 10x folder / .h5 or .loom as (AnnData of obs and var only, its counts by row slices):
    the same names as `read_cells`, without reading the matrix."""
    from cellfm.corpus.readers import open_source

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


def check_output(path: Path, *, overwrite: bool) -> None:
    """Raise before any work when `path` cannot be written (missing folder, existing file)."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} already exists; choose another name or allow replacing it")


def write_atomically(path: Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """`write(tmp)` to a hidden name beside `path`, then rename it to `path`. On any error or
    interruption (Ctrl-C) the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    check_output(path, overwrite=overwrite)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_h5ad(adata: ad.AnnData, path: str | Path, *, overwrite: bool = False) -> Path:
    """The whole AnnData to `path`, atomically."""
    return write_atomically(Path(path), adata.write_h5ad, overwrite=overwrite)


def write_embedding(adata: ad.AnnData, key: str, path: str | Path, *, overwrite: bool = False) -> Path:
    """Only obs names and `adata.obsm[key]`: a small .h5ad (obsm[key], uns["cellfm"]), or a
    .parquet table (one row per cell, columns `{key}_0..`) when the name ends in .parquet."""
    import anndata as ad
    import pandas as pd

    path = Path(path)
    emb = np.asarray(adata.obsm[key])
    if path.suffix.lower() == ".parquet":
        cols = [f"{key}_{i}" for i in range(emb.shape[1])]
        frame = pd.DataFrame(emb, index=pd.Index(adata.obs_names.astype(str), name="obs_name"), columns=cols)
        return write_atomically(path, frame.to_parquet, overwrite=overwrite)
    small = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.astype(str)), obsm={key: emb},
                       uns={k: adata.uns[k] for k in ("cellfm",) if k in adata.uns})
    return write_atomically(path, small.write_h5ad, overwrite=overwrite)
