"""Results out, atomically: every file cellfm writes goes to a hidden temporary name beside the
target and is renamed into place, so an interrupted run never leaves a complete-looking but
partial output, and an existing file is replaced only with `overwrite=True`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cellfm.wording import arg

if TYPE_CHECKING:
    import anndata as ad


def check_output(path: Path, *, overwrite: bool) -> None:
    """Raise before any work when `path` cannot be written (missing folder, existing file)."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} already exists; pass {arg('overwrite', True)} to replace it, "
                              "or choose another name")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A hidden temporary name beside `path` to write to; renamed to `path` when the block ends
    without error. On any error or interruption (Ctrl-C) the temporary file is removed and `path`
    is left as it was. Checks nothing about `path` (see `write_atomically`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """`text` to `path` atomically (replacing it: reports, indexes, manifests)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_atomically(path: Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """`write(tmp)` to a hidden name beside `path` (`atomic_path`), refusing a missing folder or an
    existing file unless `overwrite`."""
    path = Path(path)
    check_output(path, overwrite=overwrite)
    with atomic_path(path) as tmp:
        write(tmp)
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
