"""`build_corpus`: inputs of any supported format -> Arrow shards + manifest + per-file report.

Per input (one process each, in parallel): read in row chunks; check it holds human raw counts;
map genes to the vocabulary; scale each cell's library as the official preprocessing does
(`cellfm.tokenizer.scale_library`: round(count / max(1, total / 1e5)) in float32, total over all
genes of the file); keep matched genes; drop
cells with fewer than `min_genes` or more than `max_genes` expressed matched genes (official
`SCrna(filt_len=(200, 2048), prep=True)` in `train.py`, so the default `max_genes=2048`; the
2048-gene sampling of the tokenizer then never fires on a default corpus); write shards.
A bad input is reported and skipped; the others are unaffected. Re-running with the same folder
skips inputs already built (same path, size and mtime) and appends shards for new ones.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from cellfm.contract.counts import mouse_case_fraction, raw_count_problem
from cellfm.corpus.manifest import MANIFEST_NAME, REPORT_COLUMNS, CorpusManifest, ShardInfo
from cellfm.corpus.shards import CellRows, ShardWriter
from cellfm.corpus.vocabulary_link import describe_vocabulary, load_vocabulary, token_ids_for
from cellfm.io.readers import CountSource, open_source
from cellfm.progress import progress_iter
from cellfm.tokenizer import scale_library

MIN_MATCHED_FRACTION = 0.1  # fewer matched identifiers than this: not human / unknown ids


@dataclass(frozen=True)
class BuildOptions:
    vocab: object
    min_genes: int = 200
    max_genes: int | None = 2048
    chunk_cells: int = 4096
    shard_cells: int = 100_000
    batch_key: str | None = None
    label_keys: tuple[str, ...] | None = None


def build_corpus(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    vocab: object = "cellfm-27k",
    min_genes: int = 200,
    max_genes: int | None = 2048,
    workers: int = 2,
    chunk_cells: int = 4096,
    shard_cells: int = 100_000,
    batch_key: str | None = None,
    label_keys: Sequence[str] | None = None,
    progress: bool = True,
) -> CorpusManifest:
    """Build (or extend) a corpus folder from count files.

    Parameters
    ----------
    inputs
        Files (.h5ad, 10x .h5, .loom, .csv/.tsv[.gz]), 10x matrix folders, or folders holding them
        (searched recursively for .h5ad / .h5 / .loom / 10x folders).
    out_dir
        Corpus folder; created if needed. An existing corpus must use the same vocabulary and filters.
    vocab
        Vocabulary name or object; gene ids in the shards are its token ids.
    min_genes, max_genes
        Keep cells with min_genes <= expressed matched genes <= max_genes (None: no upper bound).
    workers
        Input files processed in parallel processes (<= 1: in this process).
    batch_key, label_keys
        obs column used as batch (default: the file stem) and obs columns stored as labels
        (default: all string-like columns).

    Returns
    -------
    The updated manifest; `manifest.report` (also `report.tsv`) has one row per input.

    Examples
    --------
    >>> m = build_corpus(["a.h5ad", "pbmc/filtered_feature_bc_matrix"], "corpus/")  # doctest: +SKIP
    >>> m.report[["input", "status", "cells_kept"]]  # doctest: +SKIP
    """
    out = Path(out_dir)
    vocabulary, manifest = open_corpus(out, vocab, min_genes, max_genes)
    opts = BuildOptions(vocabulary, min_genes, max_genes, chunk_cells, shard_cells, batch_key,
                        tuple(label_keys) if label_keys is not None else None)

    todo: list[Path] = []
    for path in expand_inputs(inputs):
        key = str(path)
        st = _stat(path)
        old = manifest.inputs.get(key)
        if old and old["report"]["status"] == "added" and (old["size"], old["mtime_ns"]) == st:
            continue
        if old and old["report"]["status"] == "added":  # the file changed: rebuild it
            drop_input(manifest, out, key)
        todo.append(path)

    results = []
    if workers <= 1 or len(todo) <= 1:
        for path in progress_iter(todo, "corpus inputs", unit="file", enabled=progress):
            results.append(_process_input(path, out, opts))
    else:
        # spawn, not fork: a forked worker of a process that already runs threads (torch, tiledbsoma)
        # can inherit a held lock and hang
        spawn = get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=spawn) as pool:
            futs = {pool.submit(_process_input, path, out, opts): path for path in todo}
            done = as_completed(futs)
            for f in progress_iter(done, "corpus inputs", unit="file", total=len(futs), enabled=progress):
                try:
                    results.append(f.result())
                except Exception as e:  # noqa: BLE001 — a crashed worker (e.g. a segfault in a reader)
                    report = empty_report(futs[f])
                    report.update(status="skipped", reason=f"worker failed: {type(e).__name__}: {e}"[:500])
                    results.append({"report": report, "shards": [], "stat": (0, 0)})
    # input order, not completion order, so the corpus is the same whatever the scheduling
    results.sort(key=lambda r: todo.index(Path(r["report"]["input"])))
    for r in results:
        key = r["report"]["input"]
        manifest.inputs[key] = {"size": r["stat"][0], "mtime_ns": r["stat"][1], "report": r["report"]}
        manifest.shards.extend(ShardInfo(n, c, h, key) for n, c, h in r["shards"])
    save_corpus(manifest, out)
    return manifest


def open_corpus(out: Path, vocab: object, min_genes: int, max_genes: int | None
                ) -> tuple[object, CorpusManifest]:
    """(vocabulary, manifest) of the corpus folder `out`, created if new; an existing corpus must
    use the same vocabulary and filters."""
    out.mkdir(parents=True, exist_ok=True)
    vocabulary = load_vocabulary(vocab)
    vdesc = describe_vocabulary(vocabulary)
    filters = {"min_genes": min_genes, "max_genes": max_genes}
    if not (out / MANIFEST_NAME).exists():
        return vocabulary, CorpusManifest(vocabulary=vdesc, filters=filters)
    manifest = CorpusManifest.load(out)
    if manifest.vocabulary["sha256"] != vdesc["sha256"] or manifest.filters != filters:
        raise ValueError(f"{out} was built with vocabulary {manifest.vocabulary['name']} and "
                         f"filters {manifest.filters}; cannot add with {vdesc['name']} / {filters}")
    return vocabulary, manifest


def save_corpus(manifest: CorpusManifest, out: Path) -> None:
    """manifest.json (atomic) and report.tsv."""
    manifest.save(out)
    manifest.report.to_csv(out / "report.tsv", sep="\t", index=False)


FOLDER_SUFFIXES = (".h5ad", ".h5", ".loom")  # text tables are too ambiguous to pick up unasked


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Resolved input paths; a folder that is not a 10x matrix folder stands for every .h5ad, .h5,
    .loom and 10x folder below it (sorted, so the corpus order does not depend on the file system)."""
    out: list[Path] = []
    for p in inputs:
        path = Path(p).resolve()
        if path.is_dir() and not _is_10x_folder(path):
            found = [q for q in sorted(path.rglob("*"))
                     if (q.is_file() and q.name.lower().endswith(FOLDER_SUFFIXES)
                         and not any(_is_10x_folder(a) for a in q.parents))
                     or (q.is_dir() and _is_10x_folder(q))]
            out.extend(found)
        else:
            out.append(path)
    return list(dict.fromkeys(out))


def _is_10x_folder(path: Path) -> bool:
    return (path / "matrix.mtx").exists() or (path / "matrix.mtx.gz").exists()


def _stat(path: Path) -> tuple[int, int]:
    if path.is_dir():
        files = sorted(q for q in path.iterdir() if q.is_file())
        return sum(q.stat().st_size for q in files), max((q.stat().st_mtime_ns for q in files), default=0)
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def drop_input(manifest: CorpusManifest, out: Path, key: str) -> None:
    for s in [s for s in manifest.shards if s.source == key]:
        (out / s.file).unlink(missing_ok=True)
    manifest.shards = [s for s in manifest.shards if s.source != key]
    del manifest.inputs[key]


def empty_report(path: Path) -> dict:
    r = {c: 0 for c in REPORT_COLUMNS}
    r.update(input=str(path), format="", status="", reason="", counts_from="", shards="")
    return r


def _shard_prefix(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name)[:60]
    return f"{stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def _process_input(path: Path, out: Path, opts: BuildOptions) -> dict:
    """Build the shards of one input. Never raises: failures become a 'skipped' report row."""
    report = empty_report(path)
    stat = _stat(path) if path.exists() else (0, 0)
    writer = ShardWriter(out, _shard_prefix(path), opts.shard_cells, source=str(path))
    try:
        _build_one(path, opts, writer, report)
        shards = writer.close()
        report["status"] = "added"
    except Exception as e:  # noqa: BLE001 — any failure of one input must not stop the others
        writer.abort()
        shards = []
        report.update(status="skipped", reason=f"{type(e).__name__}: {e}"[:500])
    report["shards"] = ",".join(n for n, _, _ in shards)
    return {"report": report, "shards": shards, "stat": stat}


def _gene_columns(src: CountSource, vocabulary: object) -> tuple[np.ndarray, np.ndarray]:
    """Columns of the file to keep and their token ids, sorted by token id; the first column
    wins when several identifiers map to the same gene."""
    ids = token_ids_for(src.var_names, vocabulary)
    if src.var_ids is not None:
        alt = token_ids_for(src.var_ids, vocabulary)
        if (alt > 0).sum() > (ids > 0).sum():
            ids = alt
    cols = np.flatnonzero(ids > 0)
    tok = ids[cols]
    _, first = np.unique(tok, return_index=True)  # sorted unique tokens, first column of each
    return cols[first], tok[first]


def _build_one(path: Path, opts: BuildOptions, writer: ShardWriter, report: dict) -> None:
    src = open_source(path, gene_score=lambda names: int((token_ids_for(names, opts.vocab) > 0).sum()))
    report.update(format=src.fmt, counts_from=src.counts_from)
    cols, tokens = check_genes(src, opts, report)
    write_cells(src, cols, tokens, opts, writer, report, source_name=os.path.basename(str(path)),
                default_batch=Path(path).name.split(".")[0])


def check_genes(src: CountSource, opts: BuildOptions, report: dict) -> tuple[np.ndarray, np.ndarray]:
    """The source's columns to keep and their token ids; raises when it is not human or its
    identifiers are unknown. Fills `genes_in_file` / `genes_matched` of `report`."""
    report["genes_in_file"] = len(src.var_names)
    if mouse_case_fraction(src.var_names) > 0.5:  # before mapping, which ignores case
        raise ValueError("gene symbols are in mouse case (e.g. Actb): not human")
    cols, tokens = _gene_columns(src, opts.vocab)
    report["genes_matched"] = len(cols)
    if len(cols) < opts.min_genes:
        raise ValueError(f"only {len(cols)} genes match the vocabulary (< min_genes={opts.min_genes})")
    if len(cols) < MIN_MATCHED_FRACTION * len(src.var_names):
        raise ValueError(f"only {len(cols)} of {len(src.var_names)} identifiers match the vocabulary "
                         "(not human, or unknown identifiers)")
    return cols, tokens


def write_cells(src: CountSource, cols: np.ndarray, tokens: np.ndarray, opts: BuildOptions,
                writer: ShardWriter, report: dict, *, source_name: str, default_batch: str,
                source_rows: np.ndarray | None = None) -> None:
    """Stream `src` in chunks: check counts, scale libraries, keep matched genes and the cells
    that pass the filters, write them. `source_rows` (n_cells,) replaces the row number stored per
    cell (a SOMA part stores each cell's soma_joinid)."""
    labels = src.obs
    if opts.label_keys is not None:
        labels = labels[[k for k in opts.label_keys if k in labels.columns]]
    if opts.batch_key is not None and opts.batch_key in src.obs.columns:
        batch_col = src.obs[opts.batch_key].to_numpy()
    else:
        batch_col = np.full(src.n_cells, default_batch, dtype=object)
    label_records = labels.to_dict("records") if len(labels.columns) else [{}] * src.n_cells

    for start, chunk in src.chunks(opts.chunk_cells):
        x = sp.csr_matrix(chunk, dtype=np.float64)  # (n, n_vars)
        why = raw_count_problem(x)
        if why is not None:
            raise ValueError(f"rows {start}..{start + x.shape[0]}: {why}")
        n = x.shape[0]
        total = np.asarray(x.sum(axis=1)).ravel()  # (n,) raw total over ALL genes (metadata)
        m = scale_library(x)[:, cols]  # (n, n_matched) scaled over ALL genes, columns in token order
        m.eliminate_zeros()
        m.sort_indices()
        n_expr = np.diff(m.indptr)
        keep = n_expr >= opts.min_genes
        if opts.max_genes is not None:
            keep &= n_expr <= opts.max_genes
        report["cells_read"] += n
        report["dropped_empty"] += int((n_expr == 0).sum())
        report["dropped_too_few_genes"] += int(((n_expr > 0) & (n_expr < opts.min_genes)).sum())
        if opts.max_genes is not None:
            report["dropped_too_many_genes"] += int((n_expr > opts.max_genes).sum())
        rows = np.flatnonzero(keep)
        report["cells_kept"] += len(rows)
        if len(rows) == 0:
            continue
        k = m[rows]
        src_rows = start + rows
        writer.write(CellRows(
            indptr=k.indptr.astype(np.int64),
            gene_ids=tokens[k.indices],
            counts=k.data,
            cell_id=[str(src.cell_ids[i]) for i in src_rows],
            source_row=(src_rows if source_rows is None else source_rows[src_rows]).astype(np.int64),
            batch=[str(batch_col[i]) for i in src_rows],
            labels=[label_records[i] for i in src_rows],
            raw_total=total[rows],
            source=source_name,
        ))
