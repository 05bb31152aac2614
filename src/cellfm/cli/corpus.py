"""`cellfm corpus build|info`: a thin layer over `cellfm.corpus.build_corpus` and the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellfm.cli.console import run_cli
from cellfm.corpus import CorpusManifest, build_corpus
from cellfm.corpus.soma import SomaQuery, is_soma_uri
from cellfm.corpus.soma_build import build_corpus_from_soma

app = typer.Typer(
    help="Build and inspect pretraining corpora (Arrow shards of tokenizable human raw counts).",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def build(
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Count files (.h5ad, 10x .h5, .loom, .csv/.tsv[.gz]), 10x matrix folders, or SOMA "
        "experiments (a local folder or a tiledb:// / s3:// URI).", show_default=False)] = None,
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="Corpus folder (created or extended).")] = ...,
    vocab: Annotated[str, typer.Option("--vocab", help="Built-in vocabulary name.")] = "cellfm-27k",
    min_genes: Annotated[int, typer.Option(
        "--min-genes", help="Drop cells with fewer expressed matched genes.")] = 200,
    max_genes: Annotated[int, typer.Option(
        "--max-genes", help="Drop cells with more expressed matched genes (official 2048); 0 keeps them "
        "and training samples the model's max_genes of their genes (log1p-weighted, as official).")] = 2048,
    workers: Annotated[int, typer.Option(
        "--workers", "-j", help="Input files (or SOMA parts) processed in parallel.")] = 2,
    shard_cells: Annotated[int, typer.Option("--shard-cells", help="Cells per shard file.")] = 100_000,
    batch_key: Annotated[str | None, typer.Option(
        "--batch-key", help="obs column to store as batch (default: the file stem; dataset_id for "
        "SOMA).")] = None,
    census: Annotated[str | None, typer.Option(
        "--census", is_flag=False, flag_value="stable", metavar="[VERSION]",
        help="Read the public CELLxGENE Census (VERSION: stable, latest or a date; default stable).",
        show_default=False)] = None,
    organism: Annotated[str, typer.Option("--organism", help="Census experiment.")] = "homo_sapiens",
    obs_filter: Annotated[str | None, typer.Option(
        "--obs-filter", help="SOMA value filter on obs, e.g. \"is_primary_data == True and "
        "tissue_general == 'blood'\".")] = None,
    measurement: Annotated[str, typer.Option("--measurement", help="SOMA measurement.")] = "RNA",
    layer: Annotated[str, typer.Option("--layer", help="SOMA X layer holding raw counts.")] = "raw",
) -> None:
    """Add INPUTS (and/or the Census) to the corpus at OUTPUT; inputs already in it are skipped.
    Writes report.tsv. A killed build started again with the same command keeps what it finished."""

    files = [Path(i) for i in inputs or [] if not is_soma_uri(i)]
    queries = [SomaQuery(uri=i if "://" in i else str(Path(i).resolve()), measurement=measurement,
                         layer=layer, obs_filter=obs_filter) for i in inputs or [] if is_soma_uri(i)]
    if census is not None:
        queries.append(SomaQuery(census_version=census, organism=organism, measurement=measurement,
                                 layer=layer, obs_filter=obs_filter))
    if not files and not queries:
        raise typer.BadParameter("give input files, a SOMA experiment or --census", param_hint="INPUTS")
    kw = dict(vocab=vocab, min_genes=min_genes, max_genes=max_genes or None, workers=workers,
              shard_cells=shard_cells)
    with run_cli():
        m = build_corpus(files, output, batch_key=batch_key, progress=True, **kw) if files else None
        for q in queries:
            m = build_corpus_from_soma(q, output, batch_key=batch_key or "dataset_id", **kw)
    rep = m.report
    for r in rep.itertuples():
        extra = f" ({r.reason})" if r.reason else ""
        typer.echo(f"{r.status:8s} {r.cells_kept:>9d}/{r.cells_read:<9d} cells  {r.input}{extra}")
    typer.echo(f"{output}: {m.n_cells} cells in {len(m.shards)} shards; "
               f"report: {Path(output) / 'report.tsv'}")
    if (rep["status"] == "skipped").any():
        raise typer.Exit(code=1)


@app.command()
def info(
    corpus: Annotated[Path, typer.Argument(help="Corpus folder.")],
    verify: Annotated[bool, typer.Option("--verify", help="Recompute shard checksums.")] = False,
) -> None:
    """Summarise a corpus: cells, shards, vocabulary, filters, inputs."""

    m = CorpusManifest.load(corpus)
    v = m.vocabulary
    typer.echo(f"corpus {corpus}: {m.n_cells} cells, {len(m.shards)} shards, format {m.format_version}")
    typer.echo(f"vocabulary {v['name']} ({v['n_genes']} genes, sha256 {v['sha256'][:12]}); "
               f"filters {m.filters}")
    for r in m.report.itertuples():
        typer.echo(f"  {r.status:8s} {r.cells_kept:>9d} cells  {r.input}")
    if verify:
        bad = m.verify(corpus)
        typer.echo("checksums: all shards OK" if not bad else f"checksums: {len(bad)} bad: {', '.join(bad)}")
        if bad:
            raise typer.Exit(code=1)
