"""`build_corpus_from_soma`: a SOMA query (a local experiment or the Census) -> corpus shards.

The selected cells (sorted soma_joinids) are cut into parts of `shard_cells` cells; each part is
read in row chunks and written to its own shard by the same code as a file (`check_genes`,
`write_cells`), so counts checks, library scaling, filters and report.tsv are the same. A part is
finished when its record (`.soma_parts/<name>/part_NNNNN.json`, written after the shard is renamed
into place) exists; a killed build started again with the same command redoes only the parts
without a record, whatever the moment of the kill. Parts run in parallel processes (`workers`).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from cellfm.corpus.builder import (
    BuildOptions,
    check_genes,
    drop_input,
    empty_report,
    open_corpus,
    save_corpus,
    write_cells,
)
from cellfm.corpus.manifest import CorpusManifest, ShardInfo
from cellfm.corpus.shards import ShardWriter
from cellfm.corpus.soma import SomaQuery, SomaSelection, part_source, select_cells
from cellfm.io.readers import CountSource
from cellfm.io.write import write_text
from cellfm.progress import progress_iter

PARTS_DIR = ".soma_parts"
_COUNTERS = ("cells_read", "cells_kept", "dropped_too_few_genes", "dropped_too_many_genes", "dropped_empty")


def build_corpus_from_soma(
    query: SomaQuery,
    out_dir: str | Path,
    *,
    vocab: object = "cellfm-27k",
    min_genes: int = 200,
    max_genes: int | None = 2048,
    workers: int = 2,
    chunk_cells: int = 4096,
    shard_cells: int = 100_000,
    batch_key: str | None = "dataset_id",
    label_keys: tuple[str, ...] | None = None,
    progress: bool = True,
) -> CorpusManifest:
    """Build (or extend) a corpus folder from the cells of a SOMA query.

    Same folder, filters and report as `build_corpus`; the query is one input (its key is
    `query.key`). Each cell keeps `query`'s obs columns as labels, its soma_joinid as source row,
    and `batch_key` (default dataset_id; the query's name when absent) as batch. A query already
    built with the same cells is skipped; a bad query (filter matching nothing, missing layer, no
    raw counts, ...) becomes a 'skipped' report row with the reason, like a bad file.

    Examples
    --------
    >>> q = SomaQuery(census_version="stable", obs_filter="tissue_general == 'blood'")  # doctest: +SKIP
    >>> build_corpus_from_soma(q, "corpus/").report  # doctest: +SKIP
    """
    out = Path(out_dir)
    vocabulary, manifest = open_corpus(out, vocab, min_genes, max_genes)
    opts = BuildOptions(vocabulary, min_genes, max_genes, chunk_cells, shard_cells, batch_key,
                        tuple(label_keys) if label_keys is not None else None)
    key = query.key
    report = empty_report(Path(key))
    report.update(input=key, format="soma", counts_from=f"{query.measurement}/X/{query.layer}")
    try:
        sel = select_cells(query)
        report["genes_in_file"] = len(sel.feature_names)
        check_genes(part_source_genes(sel), opts, report)
    except (ValueError, ImportError) as err:
        return _finish(manifest, out, key, {**report, "status": "skipped", "reason": str(err)[:500]}, [], "")
    fingerprint = sel.fingerprint(f"shard_cells={shard_cells}")
    old = manifest.inputs.get(key)
    if old and old["report"]["status"] == "added" and old.get("fingerprint") == fingerprint:
        return manifest
    if old and old["report"]["status"] == "added":  # the selection changed: rebuild it
        drop_input(manifest, out, key)

    parts_dir = out / PARTS_DIR / query.name
    parts_dir.mkdir(parents=True, exist_ok=True)
    bounds = list(range(0, sel.n_cells, shard_cells)) + [sel.n_cells]
    todo = [k for k in range(len(bounds) - 1) if _record(parts_dir, k, fingerprint) is None]
    # each job carries only its own joinids (a selection of 100M cells would be pickled per job)
    jobs = [(replace(sel, obs_joinids=sel.obs_joinids[bounds[k] : bounds[k + 1]]), k, bounds[k], out, opts,
             parts_dir, fingerprint) for k in todo]
    errors = []
    if workers <= 1 or len(jobs) <= 1:
        for job in progress_iter(jobs, "corpus parts", unit="part", enabled=progress):
            errors.append(_build_part(*job))
    else:
        # spawn, not fork: a forked child inherits TileDB's thread pool locks and can hang
        spawn = get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=spawn) as pool:
            futs = [pool.submit(_build_part, *job) for job in jobs]
            errors += [f.result() for f in progress_iter(futs, "corpus parts", unit="part", enabled=progress)]
    errors = [e for e in errors if e]
    records = [_record(parts_dir, k, fingerprint) for k in range(len(bounds) - 1)]
    for r in records:
        for c in _COUNTERS:
            report[c] += r["report"][c] if r else 0
    if errors:
        for r in records:
            for name, _, _ in (r or {}).get("shards", []):
                (out / name).unlink(missing_ok=True)
        shutil.rmtree(parts_dir, ignore_errors=True)
        return _finish(manifest, out, key, {**report, "status": "skipped", "reason": errors[0][:500]}, [], "")
    shards = [tuple(s) for r in records for s in r["shards"]]
    report.update(status="added", shards=",".join(n for n, _, _ in shards))
    manifest = _finish(manifest, out, key, report, shards, fingerprint, n_cells=sel.n_cells)
    shutil.rmtree(parts_dir, ignore_errors=True)
    if not any(parts_dir.parent.iterdir()):
        parts_dir.parent.rmdir()
    return manifest


def part_source_genes(sel: SomaSelection) -> CountSource:
    """A cell-less CountSource of the selection's genes, for the gene checks in this process."""
    return CountSource(Path(sel.query.where), "soma", sel.feature_names, np.array([], object),
                       lambda size: iter(()), var_ids=sel.feature_ids)


def _finish(manifest: CorpusManifest, out: Path, key: str, report: dict, shards: list, fingerprint: str,
            n_cells: int = 0) -> CorpusManifest:
    manifest.inputs[key] = {"size": n_cells, "mtime_ns": 0, "fingerprint": fingerprint, "report": report}
    manifest.shards.extend(ShardInfo(n, c, h, key) for n, c, h in shards)
    save_corpus(manifest, out)
    return manifest


def _record(parts_dir: Path, k: int, fingerprint: str) -> dict | None:
    """The record of finished part k, if it is there, belongs to this selection and its shard exists."""
    path = parts_dir / f"part_{k:05d}.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    if r.get("fingerprint") != fingerprint or not all((parts_dir.parents[1] / n).is_file()
                                                        for n, _, _ in r["shards"]):
        return None
    return r


def _build_part(part: SomaSelection, k: int, a: int, out: Path, opts: BuildOptions, parts_dir: Path,
                fingerprint: str) -> str:
    """Write part k (the cells of `part`, from cell a of the selection) and its record; '' when
    done, else the reason it failed."""
    report = {c: 0 for c in _COUNTERS}
    b = a + part.n_cells
    writer = ShardWriter(out, f"{part.query.name}-{k:05d}", shard_cells=max(1, part.n_cells),
                         source=part.query.key)
    try:
        src, joinids = part_source(part, 0, part.n_cells)
        cols, tokens = check_genes(src, opts, {})
        write_cells(src, cols, tokens, opts, writer, report, source_name=part.query.name,
                    default_batch=part.query.name, source_rows=joinids)
        shards = writer.close()
    except Exception as err:  # noqa: BLE001 — reported as the query's reason, like a bad file
        writer.abort()
        return f"cells {a}..{b}: {type(err).__name__}: {err}"
    record = {"fingerprint": fingerprint, "cells": [a, b], "shards": shards, "report": report}
    write_text(parts_dir / f"part_{k:05d}.json", json.dumps(record))  # atomic: a record means done
    return ""
