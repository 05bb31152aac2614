"""`cellfm annotate fit|predict`: cell type annotation, a thin layer over `cellfm.tasks.annotation`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellfm.cli.common import ModelOpt, ThreadsOpt, load_model, read_input, set_threads
from cellfm.cli.console import fail
from cellfm.io.write import write_h5ad

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Cell type annotation: fit on a labelled reference, predict a query.",
)
annotate_app = app


@app.command("fit")
def annotate_fit(
    reference: Annotated[Path, typer.Argument(help="Labelled reference .h5ad (raw counts).")],
    label_key: Annotated[str, typer.Option("--label-key", help="obs column with the cell types.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the fitted annotator.")],
    model: ModelOpt,
    mode: Annotated[str, typer.Option(help="frozen, lora or full.")] = "frozen",
    head: Annotated[
        str, typer.Option(help="official (type queries over the gene tokens) or cls_mlp (CLS only, cheaper).")
    ] = "official",
    max_epochs: Annotated[
        int | None, typer.Option(help="Default: 20 (official head) / 100 (cls_mlp) if frozen, else 10.")
    ] = None,
    batch_size: int = 32,
    lora_rank: int = 8,
    min_cells_per_class: int = 5,
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
    from cellfm.tasks.annotation import CellTypeAnnotator
    from cellfm.tasks.annotation_data import refuse_frozen_without_st
    from cellfm.wording import cli_wording

    set_threads(threads)
    if mode not in ("frozen", "lora", "full"):
        fail(f"--mode must be frozen, lora or full, not {mode!r}", 2)
    if head not in ("official", "cls_mlp"):
        fail(f"--head must be official or cls_mlp, not {head!r}", 2)
    if output.exists() and any(output.iterdir()) and not overwrite:
        fail(f"{output} is not empty; pass --overwrite to replace it", 2)
    adata = read_input(reference)
    cfm = load_model(model)
    if st_tokens:
        with cli_wording():
            try:
                refuse_frozen_without_st(cfm, mode)
            except ValueError as err:
                fail(f"--model {model}: {err}", 2)
    try:
        ann = CellTypeAnnotator().fit(
            adata,
            label_key,
            model=cfm,
            mode=mode,
            head=head,
            max_epochs=max_epochs,
            batch_size=batch_size,
            lora_rank=lora_rank,
            min_cells_per_class=min_cells_per_class,
            st_tokens=st_tokens,
        )
    except (KeyError, ValueError) as err:
        fail(str(err).strip('"'))
    if not model.startswith("preset:"):
        ann.encoder_source = model if mode == "frozen" else None
    ann.save(output, overwrite=True)
    kept = ann.stops[-1]
    scores = next(h for h in ann.history if h["phase"] == kept["phase"] and h["epoch"] == kept["best_epoch"])
    typer.echo(
        "\n".join(f"{s['phase']}: {s['reason']}" for s in ann.stops)
        + f"\nannotator with {len(ann.classes)} classes ({mode}, {head} head) written to {output}; "
        f"val accuracy {scores['val_acc']:.3f}, temperature {ann.temperature:.2f}; the open-set cut-offs "
        f"reject {ann.open_set.reference_rejected:.1%} of held-out reference cells"
        + (f"; ST tokens ({ann.settings['st_weights']} weights)" if st_tokens else "")
    )


@app.command("predict")
def annotate_predict(
    query: Annotated[Path, typer.Argument(help="Query .h5ad (raw counts).")],
    model: Annotated[Path, typer.Option("--model", help="Folder written by `cellfm annotate fit`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .h5ad with obs['cellfm_label'].")],
    threshold: Annotated[
        float | None, typer.Option(help="Min confidence (else 'unknown'); default: calibrated at fit.")
    ] = None,
    open_set: Annotated[bool, typer.Option(help="Label cells unlike the reference 'unknown'.")] = True,
    threads: ThreadsOpt = None,
) -> None:
    """Label the cells of a query with a fitted annotator."""
    from cellfm.tasks.annotation import CellTypeAnnotator

    set_threads(threads)
    if output.resolve() == query.resolve():
        fail("the output must be a different file than the input", 2)
    try:
        ann = CellTypeAnnotator.load(model)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    adata = read_input(query)
    try:
        ann.predict(adata, threshold=threshold, open_set=open_set)
    except (KeyError, ValueError) as err:
        fail(str(err).strip('"'))
    write_h5ad(adata, output, overwrite=True)  # atomic: a crash never leaves a half-written output
    counts = adata.obs["cellfm_label"].value_counts()
    share = adata.uns["cellfm_annotation"]["rejected_fraction"]
    typer.echo(f"{adata.n_obs} cells labelled ({share:.1%} unknown) -> {output}\n" + counts.to_string())


