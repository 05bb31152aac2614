"""`cellfm corpus build|info`: a thin layer over `cellfm.corpus.build_corpus` and the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Build and inspect pretraining corpora (Arrow shards of tokenizable human raw counts).",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def build(
    inputs: Annotated[list[Path], typer.Argument(
        help="Count files (.h5ad, 10x .h5, .loom, .csv/.tsv[.gz]) or 10x matrix folders.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Corpus folder (created or extended).")],
    vocab: Annotated[str, typer.Option("--vocab", help="Built-in vocabulary name.")] = "cellfm-27k",
    min_genes: Annotated[int, typer.Option(
        "--min-genes", help="Drop cells with fewer expressed matched genes.")] = 200,
    max_genes: Annotated[int, typer.Option(
        "--max-genes", help="Drop cells with more expressed matched genes (official 2048); 0 keeps them "
        "and training samples the model's max_genes of their genes (log1p-weighted, as official).")] = 2048,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Input files processed in parallel.")] = 2,
    shard_cells: Annotated[int, typer.Option("--shard-cells", help="Cells per shard file.")] = 100_000,
    batch_key: Annotated[str | None, typer.Option(
        "--batch-key", help="obs column to store as batch (default: the file stem).")] = None,
) -> None:
    """Add INPUTS to the corpus at OUTPUT; inputs already in it are skipped. Writes report.tsv."""
    from cellfm.corpus import build_corpus

    m = build_corpus(inputs, output, vocab=vocab, min_genes=min_genes, max_genes=max_genes or None,
                     workers=workers, shard_cells=shard_cells, batch_key=batch_key)
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
    from cellfm.corpus import CorpusManifest

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
