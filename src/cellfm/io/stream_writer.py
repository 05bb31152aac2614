"""Write an embedding that arrives in row chunks into `obsm` of an .h5ad, or a .parquet table,
without ever holding all of it (or the input's X) in memory.

The full output is the input .h5ad copied byte for byte, with `obsm[key]` (an HDF5 dataset
filled chunk by chunk) and `uns["cellfm"]` added; an in-memory AnnData (10x, loom input) is
written first and extended the same way. Everything goes to a hidden temporary name and is
renamed into place (`cellfm.io.write.write_atomically`). Nothing here runs a model.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cellfm.io.write import write_atomically

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp


def write_streamed(out: Path, chunks: Iterable[np.ndarray], *, n_cells: int, d_model: int, key: str,
                   uns: dict, obs_names: pd.Index, base: Path | ad.AnnData | None,
                   x_blocks: Iterable[sp.csr_matrix] | None = None, overwrite: bool = False) -> Path:
    """`chunks` (rows in order, (rows, d_model) float32 each) into `out`.

    base None: only cell names + embedding (.h5ad or .parquet by the name of `out`); an .h5ad
    path: a copy of that file plus obsm; an AnnData: that AnnData plus obsm, with X written from
    `x_blocks` (row chunks in order) when given.
    """
    def write(tmp: Path) -> None:
        if base is None and out.suffix.lower() == ".parquet":
            _parquet(tmp, chunks, key, obs_names)
            return
        if base is None:
            import anndata as ad
            import pandas as pd

            ad.AnnData(obs=pd.DataFrame(index=pd.Index(obs_names.astype(str)))).write_h5ad(tmp)
        elif isinstance(base, Path):
            shutil.copyfile(base, tmp)
        else:
            base.write_h5ad(tmp)
            if x_blocks is not None:
                _append_x(tmp, x_blocks)
        _append_obsm(tmp, chunks, n_cells, d_model, key, uns)

    return write_atomically(out, write, overwrite=overwrite)


def _append_x(path: Path, blocks: Iterable[sp.csr_matrix]) -> None:
    """X as a CSR matrix written block by block (anndata's sparse append)."""
    import h5py
    from anndata.io import sparse_dataset, write_elem

    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        for block in blocks:
            if "X" in f:
                sparse_dataset(f["X"]).append(block.tocsr())
            else:
                write_elem(f, "X", block.tocsr())


def _append_obsm(path: Path, chunks: Iterable[np.ndarray], n_cells: int, d_model: int, key: str,
                 uns: dict) -> None:
    import h5py
    from anndata.io import write_elem

    with h5py.File(path, "a") as f:
        obsm = f["obsm"] if "obsm" in f else f.create_group("obsm")
        if key in obsm:
            del obsm[key]
        dset = obsm.create_dataset(key, shape=(n_cells, d_model), dtype="float32",
                                   chunks=(min(n_cells, max(1, 2**20 // (4 * d_model))), d_model))
        dset.attrs["encoding-type"] = "array"
        dset.attrs["encoding-version"] = "0.2.0"
        start = 0
        for block in chunks:
            dset[start : start + len(block)] = block
            start += len(block)
        if start != n_cells:
            raise RuntimeError(f"internal error: {start} of {n_cells} embedding rows were written")
        if "uns" not in f:
            write_elem(f, "uns", {})
        if "cellfm" in f["uns"]:
            del f["uns"]["cellfm"]
        write_elem(f["uns"], "cellfm", uns)


def _parquet(path: Path, chunks: Iterable[np.ndarray], key: str, obs_names: pd.Index) -> None:
    """One row group per chunk; the same table as `cellfm.io.write.write_embedding` writes."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    start = 0
    try:
        for block in chunks:
            cols = [f"{key}_{i}" for i in range(block.shape[1])]
            index = pd.Index(obs_names[start : start + len(block)].astype(str), name="obs_name")
            table = pa.Table.from_pandas(pd.DataFrame(block, index=index, columns=cols), preserve_index=True)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            start += len(block)
    finally:
        if writer is not None:
            writer.close()
