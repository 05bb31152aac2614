"""Streaming, resumable, multi-process embedding of a count file: `embed_file(path, model, out)`.

The cells are cut into a fixed grid of `chunk_cells` rows; under `torchrun` each rank takes a
contiguous range of chunks (one process takes all of them: the same code path). Each chunk's
embeddings go to `OUT.parts/chunk-000012.npy`, written to a temporary name and then renamed, so a
file that exists is complete. `OUT.parts/index.json` records the input's identity (path, size,
mtime), a fingerprint of the model and the settings: a restarted run skips the chunks already
there, and a changed input, model or setting refuses to resume. Each rank checks only its own
rows; the ranks exchange their findings (all-gather) so that all raise the error one full pass
would raise, before any embedding (`cellfm.contract.setup`), and rank 0 alone fingerprints the
model and checks the index. When every rank is done (a barrier), rank 0 streams the chunks into
`obsm` of OUT (`cellfm.io.stream_writer`) and removes the parts folder.

Memory is one chunk of counts plus one batch of activations, whatever the number of cells: an
.h5ad is read backed, 10x and loom files through the format readers (`cellfm.io.read.open_rows`), a
corpus folder by its memory-mapped shards, in row chunks (`embedding.inputs`; a 10x .mtx
has no row index: its reader loads it whole).
The chunk grid does not depend on the number of processes, so 1 and N processes give the same
embeddings. This module does not judge counts (`cellfm.contract` does).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from cellfm.cellfm import CellFM
from cellfm.distributed import all_ranks, barrier, join_process_group, rank_and_world
from cellfm.embedding.engine import (
    check_batch_size,
    default_batch_size,
    embed_batches,
    model_record,
    on_device,
    require_st_weights,
    resolve_device,
)
from cellfm.embedding.inputs import open_input
from cellfm.embedding.memory import as_model
from cellfm.io.read import FORMATS, input_format
from cellfm.io.stream_writer import write_streamed
from cellfm.io.write import atomic_path, check_output, write_text
from cellfm.progress import progress_bar
from cellfm.wording import UsageError, arg

log = logging.getLogger(__name__)

INDEX_FORMAT = 1


@dataclass
class EmbedFileResult:
    """What one process did: `output` is None on ranks other than 0 and when stopped early."""

    output: Path | None
    n_cells: int
    n_chunks: int
    computed: int  # chunks this rank embedded
    skipped: int  # chunks this rank found already done
    uns: dict
    seconds: float = 0.0  # this rank's embedding phase: reading, tokenizing, the model, saving chunks


def parts_folder(out: str | Path) -> Path:
    """Where the chunks of `out` are kept until the merge: OUT + ".parts"."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def input_identity(path: Path) -> dict:
    """Path, size and mtime of the input (for a 10x folder: of all files in it)."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [p.stat() for p in files]
    return {"path": str(path), "size": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def model_fingerprint(model: CellFM) -> str:
    """A short hash of the config and of every weight's shape, sums and a strided sample."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.module.state_dict().items():
            flat = p.detach().flatten().double().cpu()
            sample = flat[:: max(1, flat.numel() // 1024)]
            digest.update(f"{name}{tuple(p.shape)}{flat.sum().item():.10e}{flat.abs().sum().item():.10e}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def auto_chunk_cells(n_cells: int) -> int:
    """The chunk grid when none is given: about 64 chunks, 1,024 to 8,192 cells each, so that
    processes under torchrun get several chunks each and padding inside a chunk stays small. It
    depends on the number of cells only, so a resumed run finds the same grid with any process count."""
    return int(min(8192, max(1024, -(-n_cells // 64))))


def chunk_ranges(n_cells: int, chunk_cells: int, rank: int, world: int) -> list[tuple[int, int, int]]:
    """[(chunk index, first row, end row)] of this rank: contiguous chunks, balanced by count."""
    n_chunks = -(-n_cells // chunk_cells)
    mine = np.array_split(np.arange(n_chunks), world)[rank]
    return [(int(k), int(k) * chunk_cells, min(n_cells, (int(k) + 1) * chunk_cells)) for k in mine]


def chunk_path(parts: Path, k: int) -> Path:
    return parts / f"chunk-{k:06d}.npy"


def chunk_is_done(parts: Path, k: int, rows: int, d_model: int) -> bool:
    path = chunk_path(parts, k)
    if not path.exists():
        return False
    try:
        return np.load(path, mmap_mode="r").shape == (rows, d_model)
    except (OSError, ValueError):  # a damaged file: computed again
        return False


def save_chunk(parts: Path, k: int, emb: np.ndarray) -> None:
    with atomic_path(chunk_path(parts, k)) as tmp:
        np.save(tmp, emb)


def open_index(parts: Path, record: dict) -> None:
    """Refuse to resume from chunks of another run; else create the index (rank 0 only)."""
    index = parts / "index.json"
    if index.exists():
        old = json.loads(index.read_text())
        diff = [k for k in record if old.get(k) != record[k]]
        if diff:
            what = "; ".join(f"{k}: was {old.get(k)}, now {record[k]}" for k in diff)
            raise ValueError(f"{parts} holds embeddings of another run ({what}); delete {parts} to start "
                             "over, or restore the original input and model to resume")
        return
    parts.mkdir(exist_ok=True)
    write_text(index, json.dumps(record, indent=1))


def check_paths(path: Path, out: Path, *, obsm_only: bool, overwrite: bool) -> str:
    """Refuse, before any work, an input that is missing or of no format we read and an output
    that would replace the input, has the wrong suffix or exists; returns the input's format."""
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist; give an .h5ad, 10x folder, 10x .h5 or .loom "
                                "path")
    fmt = input_format(path)
    if fmt is None:
        raise UsageError(f"{path.name} is not a format cellfm embed reads ({FORMATS}, or a corpus folder); "
                         "convert it to .h5ad first")
    if out.resolve() == path.resolve():
        raise UsageError("the output must differ from the input: the input file is never changed")
    suffix, only = out.suffix.lower(), arg("obsm_only", True)
    if (obsm_only or fmt == "corpus") and suffix not in (".h5ad", ".parquet"):
        what = "a corpus input gives cell names + embedding in" if fmt == "corpus" else f"{only} writes"
        raise UsageError(f"{what} .h5ad or .parquet; {out.name} is neither")
    if not (obsm_only or fmt == "corpus") and suffix != ".h5ad":
        raise UsageError(f"the output must end in .h5ad (got {out.name}); or pass {only} for .parquet")
    check_output(out, overwrite=overwrite)
    return fmt


def embed_file(
    path: str | Path,
    model: CellFM | str | Path,
    out: str | Path,
    *,
    obsm_only: bool = False,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    key_added: str = "X_cellfm",
    gene_key: str | None = None,
    max_genes: int | None = None,
    empty: Literal["raise", "zero"] = "raise",
    seed: int = 0,
    allow_non_integer: bool = False,
    chunk_cells: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_chunks: int | None = None,
    st_tokens: bool = False,
) -> EmbedFileResult:
    """Embed every cell of the file at `path` into `out`, streaming, on every torchrun rank.

    `path`: .h5ad, 10x folder or .h5, .loom, or a corpus folder from `cellfm corpus build`. `out`
    is an .h5ad holding the input plus `obsm[key_added]` (the input file is copied byte for
    byte, never loaded), or with `obsm_only` an .h5ad / .parquet of cell names + embedding; a
    corpus is no AnnData to extend, so it always gives the latter (names: `CorpusMatrix.obs_names`).
    Other arguments as in `cellfm.embed`; `chunk_cells` rows are read, embedded and saved at a
    time (the unit of resuming; None: `auto_chunk_cells`). `stop_after_chunks` (tests) stops
    after this many new chunks per rank, leaving the parts folder to resume from.

    Examples
    --------
    >>> cellfm.embed_file("atlas.h5ad", "cellfm-80m", "atlas_emb.parquet", obsm_only=True)
    $ torchrun --nproc-per-node 8 -m cellfm.cli embed atlas.h5ad -o atlas_emb.parquet --obsm-only
    """
    path, out = Path(path), Path(out)
    check_paths(path, out, obsm_only=obsm_only, overwrite=overwrite)
    if chunk_cells is not None and chunk_cells < 1:
        raise UsageError(f"{arg('chunk_cells', chunk_cells)}: the chunk size must be positive")
    check_batch_size(batch_size)
    rank, world = rank_and_world()
    dev = resolve_device(device)
    if dev.type == "cuda" and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    batch_size = batch_size or default_batch_size(dev)
    created = join_process_group(dev)
    opened = None
    try:
        model = as_model(model)
        if st_tokens:
            require_st_weights(model)
        d = model.config.d_model

        def rows_of(n: int) -> tuple[int, int]:  # this rank's rows: its chunks of the grid
            mine = chunk_ranges(n, chunk_cells or auto_chunk_cells(n), rank, world)
            return (mine[0][1], mine[-1][2]) if mine else (0, 0)

        opened = open_input(path, model, rows_of=rows_of, gather=all_ranks, layer=layer, use_raw=use_raw,
                            gene_key=gene_key, max_genes=max_genes, empty=empty, seed=seed,
                            allow_non_integer=allow_non_integer)
        cells, n = opened.cells, opened.cells.n_cells
        chunk_cells = chunk_cells or auto_chunk_cells(n)
        uns = {"model": model_record(model.config), "key_added": key_added, **cells.record,
               "st_tokens": bool(st_tokens)}
        parts = parts_folder(out)
        refused = None
        if rank == 0:  # one process fingerprints the model and checks / creates the index
            settings = {"layer": layer, "use_raw": use_raw, "gene_key": gene_key,
                        "max_genes": cells.max_genes,
                        "seed": seed,
                        "empty": empty, "st_tokens": bool(st_tokens)}
            record = {"format": INDEX_FORMAT, "input": input_identity(path),
                      "model": model_fingerprint(model), "settings": settings, "n_cells": n, "d_model": d,
                      "chunk_cells": chunk_cells}
            try:
                open_index(parts, record)
            except (OSError, ValueError) as err:  # the other ranks raise it too, rather than wait
                refused = err
        refused = all_ranks(refused)[0]  # also a barrier: the index exists before any chunk is written
        if refused is not None:
            raise refused
        mine = chunk_ranges(n, chunk_cells, rank, world)
        computed = skipped = 0
        bar = progress_bar(sum(b - a for _, a, b in mine), "cellfm embed", enabled=progress and rank == 0)
        stopped = False
        start = time.perf_counter()
        try:
            with on_device(model, dev) as module:
                for k, a, b in mine:
                    if chunk_is_done(parts, k, b - a, d):
                        skipped += 1
                        bar.update(b - a)
                        continue
                    if stop_after_chunks is not None and computed >= stop_after_chunks:
                        stopped = True
                        break
                    emb = np.zeros((b - a, d), dtype=np.float32)  # empty cells stay zero
                    embed_batches(module, cells.batches(batch_size, rows=(a, b), chunk_size=b - a), emb, dev,
                                  offset=a, st_tokens=st_tokens)
                    save_chunk(parts, k, emb)
                    computed += 1
                    bar.update(b - a)
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        log.info("rank %d: %d chunks embedded, %d already done", rank, computed, skipped)
        n_chunks = -(-n // chunk_cells)
        if stopped:
            return EmbedFileResult(None, n, n_chunks, computed, skipped, uns, seconds)
        barrier()  # every chunk is on disk
        written = None
        if rank == 0:
            chunks = (np.load(chunk_path(parts, k)) for k in range(n_chunks))
            full = not obsm_only and opened.base is not None
            x_blocks = opened.x_blocks() if full and opened.x_blocks else None
            written = write_streamed(out, chunks, n_cells=n, d_model=d, key=key_added, uns=uns,
                                     obs_names=opened.names(), base=opened.base if full else None,
                                     x_blocks=x_blocks, overwrite=overwrite)
            shutil.rmtree(parts)
        return EmbedFileResult(written, n, n_chunks, computed, skipped, uns, seconds)
    finally:
        if opened is not None:
            opened.close()
        if created:
            torch.distributed.destroy_process_group()
