"""Input readers: one function per file format, each returning a `CountSource`.

A `CountSource` knows its genes, its cells and their metadata up front and yields the count
matrix in row chunks (cells x genes, scipy CSR), so the builder never holds a whole file. Formats
whose layout has no per-cell index (Matrix Market, dense text with genes as rows, CSC h5ad) are
read whole: they are sample-sized in practice. Readers do not judge the counts (`cellfm.contract.counts`
does); they only ask it which matrix of an .h5ad holds counts.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellfm.contract.counts import raw_count_problem

ChunkIter = Callable[[int], Iterator[tuple[int, sp.csr_matrix]]]
RowSlice = Callable[[int, int], sp.csr_matrix]  # (a, b) -> rows a:b as CSR
DENSE_CHUNK_VALUES = 16_000_000  # dense blocks (loom, dense X, text) are cut to at most this many values


def _dense_rows(size: int, n_cols: int) -> int:
    """Rows per chunk for a dense source: `size`, but at most ~64 MB of float32 at a time."""
    return max(1, min(size, DENSE_CHUNK_VALUES // max(1, n_cols)))


@dataclass
class CountSource:
    """One input file: genes, cells, metadata, and a chunked count iterator."""

    path: Path
    fmt: str
    var_names: np.ndarray  # (n_vars,) str gene symbols (or ids when no symbols exist)
    cell_ids: np.ndarray  # (n_cells,) str
    chunks: ChunkIter  # chunk_size -> iterator of (first row, CSR (rows, n_vars) counts)
    var_ids: np.ndarray | None = None  # (n_vars,) str Ensembl ids when the format has them
    obs: pd.DataFrame = field(default_factory=pd.DataFrame)  # label columns as str, n_cells rows
    counts_from: str = "X"
    rows: RowSlice | None = None  # random access by rows, where the layout allows it (h5, loom)

    @property
    def n_cells(self) -> int:
        return len(self.cell_ids)


def open_source(path: Path, *, gene_score: Callable[[np.ndarray], int] | None = None) -> CountSource:
    """Pick the reader from the path. `gene_score(names)` counts names that are genes (used only to
    orient dense text tables)."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        return read_10x_mtx(path)
    if name.endswith(".h5ad"):
        return read_h5ad(path)
    if name.endswith(".loom"):
        return read_loom(path)
    if name.endswith(".h5"):
        return read_10x_h5(path)
    if name.endswith((".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")):
        return read_dense_text(path, gene_score=gene_score)
    raise ValueError(f"unknown input format: {path.name}")


def _str(a: np.ndarray) -> np.ndarray:
    return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in a], dtype=object)


def _label_columns(obs: pd.DataFrame) -> pd.DataFrame:
    """Keep the string-like columns (categories, strings, booleans) as str: candidate labels."""
    keep = {}
    for c in obs.columns:
        s = obs[c]
        if isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object or s.dtype == bool:
            keep[str(c)] = s.astype(str).to_numpy()
    return pd.DataFrame(keep)


def _csr_rows(h5: Path, group: str, n_cols: int) -> RowSlice:
    """Rows a:b of a CSR matrix stored as data/indices/indptr (see `_csr_chunks`), reading only
    their part of the arrays."""

    def rows(a: int, b: int) -> sp.csr_matrix:
        with h5py.File(h5, "r") as f:
            g = f[group]
            indptr = g["indptr"][a : b + 1] if b > a else np.zeros(1, np.int64)
            lo, hi = int(indptr[0]), int(indptr[-1])
            return sp.csr_matrix((g["data"][lo:hi], g["indices"][lo:hi], indptr - lo), shape=(b - a, n_cols))

    return rows


def _csr_chunks(h5: Path, group: str, n_cols: int) -> ChunkIter:
    """Row chunks of a CSR matrix stored as data/indices/indptr (h5ad X, or 10x h5 whose
    genes x cells CSC is the same arrays read as cells x genes CSR)."""

    def chunks(size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        with h5py.File(h5, "r") as f:
            g = f[group]
            indptr = g["indptr"][:]
            n = len(indptr) - 1
            for a in range(0, n, size):
                b = min(n, a + size)
                lo, hi = int(indptr[a]), int(indptr[b])
                m = sp.csr_matrix(
                    (g["data"][lo:hi], g["indices"][lo:hi], indptr[a : b + 1] - lo), shape=(b - a, n_cols)
                )
                yield a, m

    return chunks


def _h5ad_matrix(path: Path, key: str, n_cols: int) -> ChunkIter:
    with h5py.File(path, "r") as f:
        node = f[key]
        if isinstance(node, h5py.Dataset):
            def dense(size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
                with h5py.File(path, "r") as f2:
                    d = f2[key]
                    step = _dense_rows(size, d.shape[1])
                    for a in range(0, d.shape[0], step):
                        yield a, sp.csr_matrix(d[a : a + step])
            return dense
        enc = node.attrs.get("encoding-type", "")
    if enc == "csr_matrix":
        return _csr_chunks(path, key, n_cols)
    if enc == "csc_matrix":  # no row index: read whole (rare for counts)
        import anndata.io

        with h5py.File(path, "r") as f:
            whole = sp.csr_matrix(anndata.io.read_elem(f[key]))
        return lambda size: ((a, whole[a : a + size]) for a in range(0, whole.shape[0], size))
    raise ValueError(f"{path.name}: unsupported matrix encoding {enc!r} at {key}")


def _first_rows(chunks: ChunkIter, n: int = 500) -> sp.csr_matrix | None:
    for _, m in chunks(n):
        return m
    return None


def read_h5ad(path: Path) -> CountSource:
    """AnnData file, streamed with h5py. Counts come from the first of X, layers['counts'],
    raw.X whose first rows are non-negative integers."""
    import anndata.io

    with h5py.File(path, "r") as f:
        obs = anndata.io.read_elem(f["obs"])
        var_names = _str(anndata.io.read_elem(f["var"]).index.to_numpy())
        raw_var = _str(anndata.io.read_elem(f["raw/var"]).index.to_numpy()) if "raw/var" in f else None
        has_counts = "layers" in f and "counts" in f["layers"]
        has_raw = "raw" in f and "X" in f["raw"]
    candidates = [("X", "X", var_names)]
    if has_counts:
        candidates.append(("layers['counts']", "layers/counts", var_names))
    if has_raw and raw_var is not None:
        candidates.append(("raw.X", "raw/X", raw_var))
    tried = []
    for label, key, names in candidates:
        chunks = _h5ad_matrix(path, key, len(names))
        first = _first_rows(chunks)
        why = "no cells" if first is None else raw_count_problem(first)
        if why is None:
            return CountSource(path, "h5ad", names, _str(obs.index.to_numpy()), chunks,
                               obs=_label_columns(obs), counts_from=label)
        tried.append(f"{label}: {why}")
    raise ValueError("no raw counts found (" + "; ".join(tried) + ")")


def read_10x_h5(path: Path) -> CountSource:
    """CellRanger .h5: v3 (`matrix/`, features with name/id/feature_type; only 'Gene Expression'
    features are kept, as scanpy's `read_10x_h5`) or v2 (`<genome>/genes, gene_names`)."""
    with h5py.File(path, "r") as f:
        if "matrix" in f:
            g = f["matrix"]
            names = _str(g["features/name"][:])
            ids = _str(g["features/id"][:])
            kinds = _str(g["features/feature_type"][:]) if "feature_type" in g["features"] else None
            group = "matrix"
        else:
            group = next(k for k in f.keys() if isinstance(f[k], h5py.Group) and "genes" in f[k])
            g = f[group]
            names, ids, kinds = _str(g["gene_names"][:]), _str(g["genes"][:]), None
        barcodes = _str(g["barcodes"][:])
        n_genes = int(g["shape"][0])
    chunks, rows = _csr_chunks(path, group, n_genes), _csr_rows(path, group, n_genes)
    if kinds is not None and (kinds != "Gene Expression").any():
        gex = np.flatnonzero(kinds == "Gene Expression")
        names, ids = names[gex], ids[gex]
        inner, inner_rows = chunks, rows
        chunks = lambda size: ((a, m[:, gex]) for a, m in inner(size))  # noqa: E731
        rows = lambda a, b: inner_rows(a, b)[:, gex]  # noqa: E731
    return CountSource(path, "10x_h5", names, barcodes, chunks, var_ids=ids, rows=rows)


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)


def _find(folder: Path, *names: str) -> Path:
    for n in names:
        for p in (folder / n, folder / f"{n}.gz"):
            if p.exists():
                return p
    raise FileNotFoundError(f"{folder}: none of {names} found")


def read_10x_mtx(folder: Path) -> CountSource:
    """CellRanger matrix folder: matrix.mtx (genes x cells), features.tsv or genes.tsv, barcodes.tsv."""
    from scipy.io import mmread

    mtx = _find(folder, "matrix.mtx")
    feats = pd.read_csv(_find(folder, "features.tsv", "genes.tsv"), sep="\t", header=None, dtype=str)
    barcodes = pd.read_csv(_find(folder, "barcodes.tsv"), sep="\t", header=None, dtype=str)[0].to_numpy()
    with (gzip.open(mtx, "rb") if mtx.name.endswith(".gz") else open(mtx, "rb")) as fh:
        whole = sp.csr_matrix(mmread(fh).T)  # (cells, genes)
    ids = feats[0].to_numpy(dtype=object)
    names = feats[1].to_numpy(dtype=object) if feats.shape[1] > 1 else ids
    if feats.shape[1] > 2 and (feats[2] != "Gene Expression").any():
        gex = np.flatnonzero(feats[2].to_numpy() == "Gene Expression")
        whole, ids, names = whole[:, gex], ids[gex], names[gex]
    chunks = lambda size: ((a, whole[a : a + size]) for a in range(0, whole.shape[0], size))  # noqa: E731
    return CountSource(folder, "10x_mtx", names, barcodes.astype(object), chunks, var_ids=ids)


def read_loom(path: Path) -> CountSource:
    """Loom via h5py: `matrix` is genes x cells; genes in row_attrs/Gene, cells in col_attrs/CellID;
    other 1-D string column attributes become label columns."""
    with h5py.File(path, "r") as f:
        names = _str(f["row_attrs/Gene"][:])
        ids = _str(f["row_attrs/Accession"][:]) if "Accession" in f["row_attrs"] else None
        ca = f["col_attrs"]
        n_cells = f["matrix"].shape[1]
        cells = (_str(ca["CellID"][:]) if "CellID" in ca
                 else np.array([str(i) for i in range(n_cells)], object))
        labels = {k: _str(ca[k][:]) for k in ca
                  if k != "CellID" and ca[k].ndim == 1 and ca[k].dtype.kind in "SOU"}

    def chunks(size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        with h5py.File(path, "r") as f2:
            m = f2["matrix"]
            step = _dense_rows(size, m.shape[0])
            for a in range(0, n_cells, step):
                yield a, sp.csr_matrix(m[:, a : a + step].T)

    def rows(a: int, b: int) -> sp.csr_matrix:
        with h5py.File(path, "r") as f2:
            return sp.csr_matrix(f2["matrix"][:, a:b].T)

    return CountSource(path, "loom", names, cells, chunks, var_ids=ids, obs=pd.DataFrame(labels), rows=rows)


def read_dense_text(path: Path, *, gene_score: Callable[[np.ndarray], int] | None = None) -> CountSource:
    """Dense .csv/.tsv (optionally gzipped) with a header row and an index column. Cells x genes is
    streamed; when the row labels look more like genes than the header does, the table is read
    whole and transposed."""
    sep = "\t" if ".tsv" in path.name.lower() or ".txt" in path.name.lower() else ","
    header = pd.read_csv(path, sep=sep, index_col=0, nrows=0).columns.to_numpy(dtype=object)
    rows = pd.read_csv(path, sep=sep, usecols=[0], dtype=str).iloc[:, 0].to_numpy(dtype=object)
    score = gene_score or (lambda names: 0)
    if score(rows) > score(header):  # genes are rows
        table = pd.read_csv(path, sep=sep, index_col=0)
        whole = sp.csr_matrix(table.to_numpy(dtype=np.float64).T)
        chunks = lambda size: ((a, whole[a : a + size]) for a in range(0, whole.shape[0], size))  # noqa: E731
        return CountSource(path, "dense_text(genes x cells)", _str(table.index.to_numpy()),
                           _str(table.columns.to_numpy()), chunks)

    def chunks_rows(size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        a = 0
        for part in pd.read_csv(path, sep=sep, index_col=0, chunksize=_dense_rows(size, len(header))):
            yield a, sp.csr_matrix(part.to_numpy(dtype=np.float64))
            a += len(part)

    return CountSource(path, "dense_text", _str(header), _str(rows), chunks_rows)
