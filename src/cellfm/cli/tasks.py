"""Downstream task commands: `cellfm annotate fit|predict`, `integrate`, `perturb`, `gene-function`,
`gene-network`, `evaluate`. A thin layer over `cellfm.tasks`; the lead mounts them in the main app.

Input problems (missing file, label column, unknown model) end with a one-line error and exit code
1 or 2, not a traceback. Results are printed as tables and written as TSV / Markdown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

annotate_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Cell type annotation: fit on a labelled reference, predict a query.",
)

ModelOpt = Annotated[str, typer.Option("--model", help="Built-in model name, model folder or checkpoint.")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Shared data folder (default: CELLFM_DATA_DIR or shared/data beside the checkout)."
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option(help="torch CPU threads (1 is fastest on a busy machine).")]


def _fail(msg: str, code: int = 1) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def _threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(max(1, n))


def _load_model(name: str):
    from cellfm.cellfm import CellFM, load
    from cellfm.config import PRESETS

    try:
        if name.startswith("preset:") and name[7:] in PRESETS:
            return CellFM.from_preset(name[7:])  # random init, for smoke runs
        return load(name)
    except (FileNotFoundError, ValueError, KeyError) as err:
        _fail(f"could not load model {name!r}: {err}")


def _read(path: Path):
    import anndata as ad

    if not path.is_file():
        _fail(f"input file {path} does not exist", 2)
    try:
        return ad.read_h5ad(path)
    except Exception as err:  # h5py / anndata raise many types for unreadable files
        _fail(f"could not read {path}: {err}")


def _print_table(df, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in df.columns:
        t.add_column(str(c))
    for row in df.itertuples(index=False):
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    Console().print(t)


@annotate_app.command("fit")
def annotate_fit(
    reference: Annotated[Path, typer.Argument(help="Labelled reference .h5ad (raw counts).")],
    label_key: Annotated[str, typer.Option("--label-key", help="obs column with the cell types.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the fitted annotator.")],
    model: ModelOpt = "cellfm-mini",
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

    _threads(threads)
    if mode not in ("frozen", "lora", "full"):
        _fail(f"--mode must be frozen, lora or full, not {mode!r}", 2)
    if head not in ("official", "cls_mlp"):
        _fail(f"--head must be official or cls_mlp, not {head!r}", 2)
    if output.exists() and any(output.iterdir()) and not overwrite:
        _fail(f"{output} is not empty; pass --overwrite to replace it", 2)
    adata = _read(reference)
    cfm = _load_model(model)
    if st_tokens:
        with cli_wording():
            try:
                refuse_frozen_without_st(cfm, mode)
            except ValueError as err:
                _fail(f"--model {model}: {err}", 2)
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
        _fail(str(err).strip('"'))
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


@annotate_app.command("predict")
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

    _threads(threads)
    if output.resolve() == query.resolve():
        _fail("the output must be a different file than the input", 2)
    try:
        ann = CellTypeAnnotator.load(model)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    adata = _read(query)
    try:
        ann.predict(adata, threshold=threshold, open_set=open_set)
    except (KeyError, ValueError) as err:
        _fail(str(err).strip('"'))
    tmp = output.with_name(output.name + ".tmp")
    adata.write_h5ad(tmp)
    tmp.replace(output)  # atomic: a crash never leaves a half-written output
    counts = adata.obs["cellfm_label"].value_counts()
    share = adata.uns["cellfm_annotation"]["rejected_fraction"]
    typer.echo(f"{adata.n_obs} cells labelled ({share:.1%} unknown) -> {output}\n" + counts.to_string())


def integrate(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (scores TSV, maps PNG).")],
    model: ModelOpt = "cellfm-mini",
    data_dir: DataDirOpt = None,
    max_cells_per_batch: Annotated[int | None, typer.Option(help="Subsample each batch.")] = None,
    finetune_epochs: Annotated[
        int,
        typer.Option(help="Also score after this many epochs of self-supervised integration fine-tuning."),
    ] = 0,
    st_tokens: Annotated[
        bool, typer.Option(help="Fine-tune the authors' ST-token model (library-size tokens after CLS), as "
                           "their integration tutorial does; --no-st-tokens: CLS only.")
    ] = True,
    harmony: Annotated[bool, typer.Option(help="Run Harmony on the PCA when harmonypy is installed.")] = True,
    scvi_epochs: Annotated[
        int, typer.Option(help="scVI training epochs when scvi-tools is installed (0: skip scVI).")
    ] = 20,
    threads: ThreadsOpt = None,
) -> None:
    """Batch integration benchmark (PBMC 4k + pbmc3k + celltypist sample; batch = data set).

    Scores come from scib-metrics when installed (pip install 'cellfm[eval]'), else from an
    approximate stand-in, and the output says which.
    """
    from cellfm.tasks.integration import build_pbmc_batches, describe_run, evaluate_integration
    from cellfm.tasks.report_plots import embedding_maps

    _threads(threads)
    if scvi_epochs < 0:
        _fail(f"--scvi-epochs must be 0 (skip scVI) or more, not {scvi_epochs}", 2)
    cfm = _load_model(model)
    try:
        adata = build_pbmc_batches(data_dir, max_cells_per_batch=max_cells_per_batch)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err), 2)
    r = evaluate_integration(
        adata, cfm, finetune_epochs=finetune_epochs, harmony=harmony, scvi_epochs=scvi_epochs,
        st_tokens=st_tokens
    )
    output.mkdir(parents=True, exist_ok=True)
    _write_tsv(r["table"], output / "integration_scores.tsv")
    _write_text(describe_run(r) + "\n", output / "integration_methods.txt")
    embedding_maps(r["embeddings"], adata.obs, ["coarse_type", "batch"], output / "integration_maps.png")
    from cellfm.tasks.integration_metrics import AGGREGATES

    _print_table(r["table"][["method", *AGGREGATES]], f"batch integration ({r['scorer']})")
    typer.echo(describe_run(r) + f"\nevery metric: {output / 'integration_scores.tsv'}")


def _write_tsv(df, path: Path) -> None:
    _write_text(df.to_csv(sep="\t", index=False), path)


def _write_text(text: str, path: Path) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def perturb(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (TSV tables).")],
    model: ModelOpt = "cellfm-mini",
    data_dir: DataDirOpt = None,
    input: Annotated[
        Path | None,
        typer.Option("--input", help="Your own screen (.h5ad, raw counts) instead of Papalexi 2021; "
                     "obs[--condition-key] is 'ctrl' or 'GENE+ctrl'."),
    ] = None,
    condition_key: Annotated[str, typer.Option(help="obs column of the condition.")] = "condition",
    control: Annotated[str, typer.Option(help="Condition name of the control cells.")] = "ctrl",
    size_factor_key: Annotated[
        str | None,
        typer.Option(help="obs column with each cell's full-transcriptome count (used when present; "
                     "else the panel's total)."),
    ] = "response_n_umis",
    method: Annotated[
        str,
        typer.Option(help="gears: GEARS, GEARS + CellFM gene tokens and the linear baselines on GEARS' "
                     "splits (needs the gears extra); embedding: only the fast gene-embedding predictors "
                     "(k-fold); auto: gears when installed."),
    ] = "auto",
    splits: Annotated[int, typer.Option(help="GEARS simulation splits (seeds 1..N).")] = 3,
    epochs: Annotated[int, typer.Option(help="GEARS training epochs.")] = 10,
    max_cells_per_condition: Annotated[
        int, typer.Option(help="Cells kept per knock-out and of the controls (0: all; GEARS on CPU is slow).")
    ] = 200,
    n_folds: Annotated[int, typer.Option(help="Folds of the --method embedding predictors.")] = 5,
    threads: ThreadsOpt = None,
) -> None:
    """Predict unseen knock-out effects (Papalexi 2021 ECCITE-seq): GEARS offline, GEARS + CellFM,
    simple baselines."""
    from cellfm.tasks.benchmark_data import benchmark_path, load_benchmark

    if method not in ("auto", "gears", "embedding"):
        _fail(f"--method {method!r} is not one of auto, gears, embedding", 2)
    if splits < 1 or epochs < 1 or max_cells_per_condition < 0:
        _fail("--splits and --epochs must be >= 1 and --max-cells-per-condition >= 0", 2)
    if method != "embedding":
        from cellfm.tasks.perturbation_gears import require_gears

        try:
            require_gears()
            method = "gears"
        except ImportError as err:
            if method == "gears":
                _fail(f"{err}; or run --method embedding", 2)
            typer.echo(f"note: {err}; running --method embedding")
            method = "embedding"
    _threads(threads)
    cfm = _load_model(model)
    try:
        adata = _read(input) if input is not None else load_benchmark("papalexi", data_dir)
        ref = load_benchmark("pbmc4k", data_dir) if method == "embedding" else None
        go_dir = benchmark_path("papalexi", data_dir).parents[1] / "go_annotations_org_hs_eg_db"
    except FileNotFoundError as err:
        _fail(str(err), 2)
    from cellfm.tasks.perturbation import evaluate_perturbation
    from cellfm.tasks.perturbation_benchmark import evaluate_perturbation_gears, perturbation_markdown
    from cellfm.tasks.perturbation_gears import GearsConfig
    from cellfm.wording import cli_wording

    cfg = GearsConfig(epochs=epochs, max_cells_per_condition=max_cells_per_condition or None)
    try:
        with cli_wording():  # the input checks run first and name flags
            if method == "embedding":
                r = evaluate_perturbation(adata, cfm, reference=ref, n_folds=n_folds,
                                          condition_key=condition_key, control=control)
            else:
                r = evaluate_perturbation_gears(
                    adata, cfm, go_dir, seeds=tuple(range(1, splits + 1)), config=cfg,
                    condition_key=condition_key, control=control, size_factor_key=size_factor_key,
                    log=typer.echo,
                )
    except (KeyError, ValueError, FileNotFoundError) as err:
        _fail(err.args[0], 2)
    output.mkdir(parents=True, exist_ok=True)
    if method == "embedding":
        _write_tsv(r["table"], output / "perturbation_scores.tsv")
        _write_tsv(r["per_perturbation"], output / "perturbation_per_knockout.tsv")
        _print_table(r["table"], f"held-out perturbations, {n_folds}-fold (mean over knock-outs)")
        return
    _write_tsv(r["table"], output / "perturbation_scores.tsv")
    _write_tsv(r["per_perturbation"], output / "perturbation_per_knockout.tsv")
    _write_text(perturbation_markdown(r["table"]) + "\n", output / "perturbation_scores.md")
    _print_table(r["table"][["method", "pearson_delta", "pearson_delta_de", "mse_de"]],
                 f"unseen knock-outs, GEARS simulation split x {splits} (mean over knock-outs and splits)")


def gene_function(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (TSV tables).")],
    model: ModelOpt = "cellfm-mini",
    data_dir: DataDirOpt = None,
    go: Annotated[bool, typer.Option(help="Also run the multi-label GO term tasks.")] = True,
    all_binary_tasks: Annotated[
        bool, typer.Option(help="All six Geneformer gene tasks instead of the paper's three.")
    ] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Gene function prediction from gene embeddings as the CellFM paper scores it.

    Geneformer's binary gene tasks (5-fold accuracy and AUROC) and GO BP/MF/CC top-10 terms
    (multi-label, AUPR and AUROC).
    """
    from cellfm.tasks.benchmark_data import load_benchmark
    from cellfm.tasks.gene_function import PAPER_BINARY_TASKS, evaluate_binary_tasks, evaluate_go_terms

    _threads(threads)
    cfm = _load_model(model)
    try:
        ref = load_benchmark("pbmc4k", data_dir)
        chosen = None if all_binary_tasks else list(PAPER_BINARY_TASKS)
        binary = evaluate_binary_tasks(cfm, data_dir=data_dir, reference=ref, tasks=chosen)
    except FileNotFoundError as err:
        _fail(str(err), 2)
    output.mkdir(parents=True, exist_ok=True)
    _write_tsv(binary, output / "gene_function_binary.tsv")
    _print_table(binary, "binary gene tasks (5-fold CV)")
    if go:
        res = evaluate_go_terms(cfm, data_dir=data_dir, reference=ref)
        _write_tsv(res["summary"], output / "gene_function_go.tsv")
        _write_tsv(res["terms"], output / "gene_function_go_terms.tsv")
        _print_table(res["summary"], "GO top-10 terms, multi-label (5-fold CV)")


def gene_network(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (neighbours + enrichment).")],
    model: ModelOpt = "cellfm-mini",
    data_dir: DataDirOpt = None,
    k: Annotated[int, typer.Option(help="Neighbours per gene.")] = 10,
    threads: ThreadsOpt = None,
) -> None:
    """Top-k gene neighbours by embedding cosine, and their GO BP / Reactome co-membership."""
    from cellfm.tasks.benchmark_data import load_benchmark
    from cellfm.tasks.gene_network import evaluate_gene_network

    _threads(threads)
    cfm = _load_model(model)
    try:
        ref = load_benchmark("pbmc4k", data_dir)
        r = evaluate_gene_network(cfm, data_dir=data_dir, reference=ref, k=k)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err), 2)
    output.mkdir(parents=True, exist_ok=True)
    r["neighbours"].to_csv(output / f"gene_neighbours_top{k}.tsv", sep="\t", index=False)
    r["table"].to_csv(output / "gene_network_enrichment.tsv", sep="\t", index=False)
    _print_table(r["table"], f"top-{k} neighbour co-annotation")


def evaluate(
    output: Annotated[Path, typer.Option("-o", "--output", help="Report folder (report.md + PNGs).")],
    model: ModelOpt = "cellfm-mini",
    data_dir: DataDirOpt = None,
    tasks: Annotated[
        str,
        typer.Option(
            help="Comma-separated subset of: cell_identity, annotation, integration, "
            "perturbation, gene_function, gene_network."
        ),
    ] = "",
    mode: Annotated[str, typer.Option(help="Annotation training mode: frozen, lora or full.")] = "frozen",
    quick: Annotated[bool, typer.Option(help="Subsample cells and genes (minutes on a CPU).")] = False,
    integration_finetune_epochs: Annotated[int, typer.Option(help="Epochs of integration fine-tuning.")] = 1,
    threads: ThreadsOpt = None,
) -> None:
    """Run every downstream task on the real data and write a Markdown report."""
    from cellfm.tasks.report import TASKS, run_evaluation

    _threads(threads)
    chosen = tuple(t.strip() for t in tasks.split(",") if t.strip()) or TASKS
    bad = sorted(set(chosen) - set(TASKS))
    if bad:
        _fail(f"unknown tasks {bad}; choose from {', '.join(TASKS)}", 2)
    cfm = _load_model(model)
    path = run_evaluation(
        cfm, output, data_dir=data_dir, tasks=chosen, annotation_mode=mode, quick=quick, model_name=model
    )
    typer.echo(f"report written to {path}")
