"""`cellfm annotate fit|predict`: cell type annotation, a thin layer over `cellfm.tasks.annotation`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellfm.cli.common import ModelOpt, ThreadsOpt, load_model, read_input, set_threads
from cellfm.cli.console import fail, one_line_warnings, run_cli
from cellfm.io.write import write_h5ad
from cellfm.tasks.annotation import AnnotatorConfig, CellTypeAnnotator, compare_on_query

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Cell type annotation: fit on a labelled reference, predict a query.",
)
annotate_app = app
LayerOpt = Annotated[str | None, typer.Option(help="Counts from this layer instead of X.")]
UseRawOpt = Annotated[bool, typer.Option("--use-raw", help="Counts (and genes) from .raw.")]
GeneKeyOpt = Annotated[str | None, typer.Option(help="var column with gene symbols / Ensembl ids.")]


@app.command("fit")
def annotate_fit(
    reference: Annotated[Path, typer.Argument(help="Labelled reference .h5ad (raw counts).")],
    label_key: Annotated[str, typer.Option("--label-key", help="obs column with the cell types.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the fitted annotator.")],
    model: ModelOpt,
    mode: Annotated[str, typer.Option(help="frozen, lora or full.")] = "frozen",
    head: Annotated[
        str, typer.Option(help="auto (frozen: the better of official and cls_linear on held-out reference "
                          "cells), official, cls_linear or cls_mlp.")
    ] = "auto",
    max_epochs: Annotated[
        int | None, typer.Option(help="Default: 40 (official head) / 100 (cls_mlp) if frozen, else 10.")
    ] = None,
    max_rejected: Annotated[
        float, typer.Option(help="Most held-out reference cells the rejection rule may call unknown.")
    ] = 0.05,
    batch_size: int = 32,
    lora_rank: int = 8,
    min_cells_per_class: int = 5,
    layer: LayerOpt = None,
    use_raw: UseRawOpt = False,
    gene_key: GeneKeyOpt = None,
    overwrite: bool = False,
    threads: ThreadsOpt = None,
    st_tokens: Annotated[
        bool,
        typer.Option(
            "--st-tokens",
            help="Add the two ST tokens (each cell's total count) after CLS, as the authors' fine-tuning "
            "model; lora/full train them (new ones if the model has none), frozen needs a model with them.",
        ),
    ] = False,
) -> None:
    """Train a cell type annotator on a labelled reference."""
    with run_cli() as console, one_line_warnings(console):
        set_threads(threads)
        if output.exists() and any(output.iterdir()) and not overwrite:
            fail(f"{output} is not empty; pass --overwrite to replace it", 2)
        try:
            config = AnnotatorConfig(head=head, mode=mode, max_epochs=max_epochs, batch_size=batch_size,
                                     lora_rank=lora_rank, min_cells_per_class=min_cells_per_class,
                                     max_rejected=max_rejected, st_tokens=st_tokens)
        except ValueError as err:
            fail(f"--{str(err)}", 2)
        adata = read_input(reference)
        cfm = load_model(model)
        try:
            ann = CellTypeAnnotator(cfm, config)
            ann.fit(adata, label_key, layer=layer, use_raw=use_raw, gene_key=gene_key)
        except (KeyError, ValueError) as err:
            fail(f"--model {model}: {err}" if "ST-token" in str(err) else str(err).strip('"'),
                 2 if "ST-token" in str(err) else 1)
        if not model.startswith("preset:") and ann.encoder is cfm:
            ann.encoder_source = model  # unchanged named encoder: saved by name
        ann.save(output, overwrite=True)
        sel = ann.settings["head_selection"]
        chosen = (f"head {ann.settings['head']} kept ({sel['criterion']}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in sel["scores"].items()) + ")")
        typer.echo(
            "\n".join(f"{s['phase']}: {s['reason']}" for s in ann.stops)
            + f"\n{chosen}\nannotator with {len(ann.classes)} classes ({ann.settings['mode']}) written to "
            f"{output}; temperature {ann.temperature:.2f}; the rejection rule calls "
            f"{ann.open_set.reference_rejected:.1%} of held-out reference cells unknown"
            + (f"; ST tokens ({ann.settings['st_weights']} weights)" if st_tokens else "")
        )


@app.command("predict")
def annotate_predict(
    query: Annotated[Path, typer.Argument(help="Query .h5ad (raw counts).")],
    model: Annotated[Path, typer.Option("--model", help="Folder written by `cellfm annotate fit`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .h5ad with obs['<key>_label'].")],
    threshold: Annotated[
        float | None, typer.Option(help="Min confidence (else 'unknown'); default: calibrated at fit.")
    ] = None,
    no_reject: Annotated[bool, typer.Option("--no-reject", help="Never say 'unknown'.")] = False,
    key_added: Annotated[str, typer.Option(help="Prefix of the obs columns and the uns record.")] = "cellfm",
    truth_key: Annotated[
        str | None,
        typer.Option(help="obs column of the query with true types: print scores beside baselines."),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(help="The reference the annotator was fitted on (for --truth-key baselines)."),
    ] = None,
    layer: LayerOpt = None,
    use_raw: UseRawOpt = False,
    gene_key: GeneKeyOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Label the cells of a query with a fitted annotator."""
    with run_cli() as console, one_line_warnings(console):
        set_threads(threads)
        if output.resolve() == query.resolve():
            fail("the output must be a different file than the input", 2)
        if truth_key is not None and reference is None:
            fail("--truth-key needs --reference (the labelled reference the baselines are fitted on)", 2)
        try:
            ann = CellTypeAnnotator.load(model)
        except (FileNotFoundError, ValueError) as err:
            fail(str(err))
        adata = read_input(query)
        ref = read_input(reference) if reference is not None else None
        try:
            ann.predict(adata, key_added=key_added, threshold=threshold, reject=not no_reject, layer=layer,
                        use_raw=use_raw, gene_key=gene_key)
            table = None if ref is None or truth_key is None else compare_on_query(
                ann, ref, adata, truth_key, key_added=key_added, layer=layer, use_raw=use_raw)
        except (KeyError, ValueError) as err:
            fail(str(err).strip('"'))
        write_h5ad(adata, output, overwrite=True)  # atomic: a crash never leaves a half-written output
        counts = adata.obs[f"{key_added}_label"].value_counts()
        share = adata.uns[f"{key_added}_annotation"]["rejected_fraction"]
        typer.echo(f"{adata.n_obs} cells labelled ({share:.1%} unknown) -> {output}\n" + counts.to_string())
        if table is not None:
            typer.echo(f"\nscores against obs[{truth_key!r}]: closed set (every cell its most likely type); "
                       "_all: over all cells, unknown = wrong; _accepted: over accepted cells only\n"
                       + table.round(3).to_string(index=False, na_rep=""))
