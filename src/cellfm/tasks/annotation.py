"""Cell type annotation: `CellTypeAnnotator`, the user object (scvi-tools style).

`fit` on a labelled reference, `predict` on a query (writes `obs["cellfm_label"]`,
`obs["cellfm_confidence"]`, and the rejected share in `uns["cellfm_annotation"]`), `save`/`load`.

Heads (`head=`):
- "official" (default): the authors' annotation network (`cellfm.model.cell_type_head.CellTypeHead`): learned
  type embeddings cross-attend over the encoder's gene tokens; both losses summed.
- "cls_mlp": a residual MLP on the CLS vector against learned type embeddings (cheaper).
Modes, as in the official CellAnnotation tutorial:
- "frozen": the encoder is fixed; its outputs are computed once (`TokenStates`) and the head trains
  on them.
- "lora": LoRA adapters (rank `lora_rank`) in every encoder projection + the head.
- "full": every encoder parameter trains with the head.
`st_tokens=True` puts the two ST tokens of the authors' fine-tuning model (the cell's total count)
after CLS in every mode; in lora / full they train (new ones, official init, when the model has
none: `settings["st_weights"]` says "new" or "checkpoint").
LoRA / full first train the head on the frozen encoder (linear-probe-then-fine-tune) and keep that
state unless joint training lowers the validation loss. Then temperature scaling and the open-set
rule are calibrated on the validation cells (`annotation_open_set`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from cellfm.tasks.annotation_cache import TokenStates
from cellfm.tasks.annotation_data import (
    checked_labels,
    matched_genes,
    st_encoder,
    stratified_split,
    token_batches,
    trainable_copy,
)
from cellfm.tasks.annotation_head import AnnotationHead, fit_temperature
from cellfm.tasks.annotation_io import new_head
from cellfm.tasks.annotation_open_set import OpenSetRule, calibrate_open_set
from cellfm.tasks.annotation_training import (
    encoder_epoch_fn,
    evaluate_cached,
    frozen_epoch_fn,
    train_with_early_stopping,
)

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM

log = logging.getLogger(__name__)
Mode = Literal["frozen", "lora", "full"]
Head = Literal["official", "cls_mlp"]
UNKNOWN = "unknown"


class CellTypeAnnotator:
    """Cell type classifier on top of a CellFM encoder.

    Examples
    --------
    >>> ann = CellTypeAnnotator().fit(ref, "cell_type", model=cellfm.load("cellfm-mini"))
    >>> ann.history[-1]                    # per-epoch train/val loss and accuracy
    >>> ann.predict(query)                 # query.obs["cellfm_label"], uns["cellfm_annotation"]
    >>> ann.save("annotator/"); ann = CellTypeAnnotator.load("annotator/")
    """

    def __init__(self) -> None:
        self.encoder: CellFM | None = None
        self.encoder_source: str | None = None  # name/path of an unchanged (frozen) encoder
        self.head: nn.Module | None = None
        self.head_type: Head = "official"
        self.classes: list[str] = []
        self.settings: dict = {}
        self.temperature = 1.0
        self.open_set: OpenSetRule | None = None
        self.reference_genes: list[str] = []
        self.history: list[dict] = []  # one dict per epoch: phase, epoch, train/val loss and accuracy
        self.stops: list[dict] = []  # per training phase: how many epochs, why it stopped, best epoch

    @property
    def threshold(self) -> float:
        return self.open_set.threshold if self.open_set is not None else float("nan")

    # ---- training -----------------------------------------------------------------------
    def fit(
        self,
        adata: ad.AnnData,
        label_key: str,
        *,
        model: CellFM | str | Path = "cellfm-mini",
        mode: Mode = "frozen",
        head: Head = "official",
        val_fraction: float = 0.1,
        max_epochs: int | None = None,
        patience: int = 5,
        batch_size: int = 32,
        lr: float = 1e-4,
        head_lr: float = 1e-3,
        lora_rank: int = 8,
        class_weights: bool = True,
        min_cells_per_class: int = 5,
        threshold: float = 0.5,
        max_rejected: float = 0.05,
        device: str | torch.device | None = "cpu",
        seed: int = 0,
        progress: bool = True,
        st_tokens: bool = False,
    ) -> CellTypeAnnotator:
        """Train on the labelled cells of `adata` (raw counts in X) with labels in `obs[label_key]`.

        Classes with fewer than `min_cells_per_class` cells are dropped with a warning; cells
        labelled "?", "unknown" or empty are ignored. `max_epochs` of the head on the frozen
        encoder defaults to 20 ("official") or 100 ("cls_mlp"); of joint training (lora/full) to 10.
        `threshold` (min confidence) and the centroid-distance cut-off are calibrated so that at
        most `max_rejected` of the held-out reference cells would be called unknown.
        `st_tokens`: ST tokens in the encoder's input (frozen mode needs a model with ST weights).
        """
        from cellfm.embedding.engine import resolve_device
        from cellfm.embedding.memory import as_model as resolve_model

        if mode not in ("frozen", "lora", "full"):
            raise ValueError(f"mode must be 'frozen', 'lora' or 'full', not {mode!r}")
        if head not in ("official", "cls_mlp"):
            raise ValueError(f"head must be 'official' or 'cls_mlp', not {head!r}")
        if not 0 < val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
        if not 0 <= max_rejected < 1:
            raise ValueError(f"max_rejected must be in [0, 1), got {max_rejected}")
        labels = checked_labels(adata, label_key, min_cells_per_class)
        keep = labels.notna().to_numpy()
        ref = adata[keep].copy() if not keep.all() else adata
        y_str = labels[keep].astype(str).to_numpy()
        self.classes = sorted(np.unique(y_str).tolist())
        y = np.searchsorted(self.classes, y_str)
        n_cls = len(self.classes)

        dev = resolve_device(device)
        base = resolve_model(model)
        st_weights = None
        if st_tokens:
            torch.manual_seed(seed)  # new ST weights, if any, are reproducible
            base, st_weights = st_encoder(base, mode)
        self.encoder_source = str(model) if not _is_model_object(model) and mode == "frozen" else None
        self.reference_genes = matched_genes(ref, base)
        head_epochs = 20 if head == "official" else 100
        max_epochs = max_epochs if max_epochs is not None else (head_epochs if mode == "frozen" else 10)
        self.head_type = head
        self.settings = dict(
            label_key=label_key,
            mode=mode,
            head=head,
            val_fraction=val_fraction,
            max_epochs=max_epochs,
            patience=patience,
            batch_size=batch_size,
            lr=lr,
            head_lr=head_lr,
            lora_rank=lora_rank if mode == "lora" else 0,
            class_weights=class_weights,
            min_cells_per_class=min_cells_per_class,
            max_rejected=max_rejected,
            seed=seed,
            st_tokens=bool(st_tokens),
            st_weights=st_weights,
        )
        self.history, self.stops = [], []

        train_idx, val_idx = stratified_split(y, val_fraction, seed)
        counts = np.bincount(y[train_idx], minlength=n_cls)
        weight = torch.tensor(len(train_idx) / (n_cls * np.maximum(counts, 1)), dtype=torch.float32)
        weight = weight if class_weights else None
        torch.manual_seed(seed)
        self.head = new_head(head, base.config, n_cls).to(dev)

        cache = TokenStates.compute(
            ref, base, dev, keep_tokens=head == "official", progress=progress, seed=seed, st_tokens=st_tokens
        )
        if isinstance(self.head, AnnotationHead):
            self.head.set_input_scale(torch.from_numpy(cache.cls[train_idx]).to(dev))
        frozen_epochs = max_epochs if mode == "frozen" else head_epochs
        # the CLS-only head is cheap per cell: larger batches settle faster
        head_bs = batch_size if head == "official" else max(batch_size, 64)
        epoch = frozen_epoch_fn(self.head, cache, y, train_idx, val_idx, weight, head_lr, head_bs, dev, seed)
        with _threads_for(head):
            self.stops.append(
                train_with_early_stopping(
                    epoch,
                    [self.head],
                    max_epochs=frozen_epochs,
                    patience=patience,
                    phase="head (frozen encoder)",
                    history=self.history,
                    progress=progress,
                )
            )
        self.encoder = base
        if mode != "frozen":
            self.encoder = trainable_copy(base, mode, lora_rank, train_st=st_tokens)
            self._train_encoder(
                ref, y, train_idx, val_idx, weight, max_epochs, patience, batch_size, lr, dev, seed, progress
            )
            cache = TokenStates.compute(
                ref, self.encoder, dev, keep_tokens=head == "official", progress=progress, seed=seed,
                st_tokens=st_tokens,
            )

        # calibration on the held-out (validation) cells
        self.head.cpu().eval()
        yv = torch.from_numpy(y[val_idx]).long()
        val_logits = evaluate_cached(self.head, cache, val_idx, None, None, torch.device("cpu"))[0]
        self.temperature = fit_temperature(val_logits, yv)
        conf_val = torch.softmax(val_logits / self.temperature, -1).max(1).values.numpy()
        self.open_set = calibrate_open_set(
            cache.cls[train_idx], y[train_idx], n_cls, cache.cls[val_idx], conf_val, threshold, max_rejected
        )
        log.info(
            "annotate: open-set cut-offs reject %.1f%% of held-out reference cells (confidence < %.3f or "
            "centroid distance > %.3f)",
            100 * self.open_set.reference_rejected,
            self.open_set.threshold,
            self.open_set.distance_cutoff,
        )
        return self

    def _train_encoder(
        self, ref, y, train_idx, val_idx, weight, max_epochs, patience, batch_size, lr, dev, seed, progress
    ) -> None:
        module = self.encoder.module.to(dev)
        self.head.to(dev)
        train_batches = token_batches(ref[train_idx].copy(), self.encoder, batch_size, seed)
        val_batches = token_batches(ref[val_idx].copy(), self.encoder, batch_size, seed)
        y_train, y_val = torch.from_numpy(y[train_idx]).long(), torch.from_numpy(y[val_idx]).long()
        # the warm head moves at the encoder's pace (official recipe: one learning rate)
        epoch, validate = encoder_epoch_fn(
            module, self.head, train_batches, val_batches, y_train, y_val, weight, lr, lr, dev, seed,
            st_tokens=self.settings["st_tokens"],
        )
        self.stops.append(
            train_with_early_stopping(
                epoch,
                [self.head, module],
                max_epochs=max_epochs,
                patience=patience,
                phase=f"{self.settings['mode']} fine-tune",
                history=self.history,
                progress=progress,
                initial=validate,
            )
        )
        module.cpu().eval()
        if self.encoder.config.lora_rank:
            module.merge_lora()  # same outputs, plain linear cost, plain checkpoint keys
            self.encoder.config = self.encoder.config.replace(lora_rank=0)
            module.config = self.encoder.config

    # ---- inference ----------------------------------------------------------------------
    def predict(
        self,
        adata: ad.AnnData,
        *,
        threshold: float | None = None,
        open_set: bool = True,
        device: str | torch.device | None = "cpu",
        progress: bool = True,
    ) -> None:
        """Label the cells of `adata` (raw counts) in place.

        Writes `obs["cellfm_label"]` (a reference type or "unknown"), `obs["cellfm_confidence"]`
        (calibrated max probability), `obs["cellfm_label_closed_set"]` (the most likely type, never
        "unknown"), `obs["cellfm_centroid_distance"]` (distance to the nearest type centroid over
        the calibrated cut-off; > 1 means unlike the reference) and `uns["cellfm_annotation"]`
        (the rejected share of the query and the cut-offs used). `threshold` overrides the
        calibrated confidence threshold.
        """
        probs, emb = self._probabilities(adata, device, progress)
        rule = self.open_set
        threshold = rule.threshold if threshold is None else float(threshold)
        best, conf = probs.argmax(1), probs.max(1)
        dist = rule.distance(emb)
        closed = np.asarray(self.classes, dtype=object)[best]
        label = closed.copy()
        rejected = ((conf < threshold) | (dist > 1.0)) if open_set else np.zeros(len(label), bool)
        label[rejected] = UNKNOWN
        adata.obs["cellfm_label"] = pd.Categorical(label, categories=[*self.classes, UNKNOWN])
        adata.obs["cellfm_label_closed_set"] = pd.Categorical(closed, categories=self.classes)
        adata.obs["cellfm_confidence"] = conf.astype(np.float32)
        adata.obs["cellfm_centroid_distance"] = dist.astype(np.float32)
        adata.uns["cellfm_annotation"] = {
            "rejected_fraction": float(rejected.mean()),
            "n_rejected": int(rejected.sum()),
            "rejected_low_confidence": int((open_set & (conf < threshold)).sum()),
            "rejected_far_from_reference": int((open_set & (dist > 1.0)).sum()),
            "open_set": bool(open_set),
            "threshold": threshold,
            "distance_cutoff": rule.distance_cutoff,
            "reference_rejected_fraction": rule.reference_rejected,
            "head": self.head_type,
            "mode": self.settings.get("mode", ""),
        }

    def predict_proba(self, adata: ad.AnnData, device: str | torch.device | None = "cpu") -> pd.DataFrame:
        """Calibrated class probabilities (n_cells, n_classes) as a DataFrame."""
        return pd.DataFrame(
            self._probabilities(adata, device, False)[0], index=adata.obs_names, columns=self.classes
        )

    def _probabilities(self, adata, device, progress) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (N, C) and CLS embeddings (N, D) of the cells of `adata`."""
        import warnings

        from cellfm.embedding.engine import resolve_device

        if self.head is None or self.encoder is None:
            raise RuntimeError("this CellTypeAnnotator is not fitted: call fit() or CellTypeAnnotator.load()")
        shared = len(set(matched_genes(adata, self.encoder)) & set(self.reference_genes))
        if shared == 0:
            raise ValueError(
                f"none of the {len(self.reference_genes)} reference genes is in the query "
                f"(query genes e.g. {list(adata.var_names[:5])}); query and reference need the same gene "
                "identifiers (symbols or Ensembl ids)"
            )
        if shared < 0.5 * len(self.reference_genes):
            warnings.warn(
                f"the query shares only {shared} of the {len(self.reference_genes)} reference genes; "
                "predictions may be unreliable",
                stacklevel=3,
            )
        dev = resolve_device(device)
        cache = TokenStates.compute(
            adata,
            self.encoder,
            dev,
            keep_tokens=self.head_type == "official",
            progress=progress,
            seed=self.settings.get("seed", 0),
            st_tokens=self.settings.get("st_tokens", False),
        )
        self.head.to(dev)
        logits = evaluate_cached(self.head, cache, np.arange(adata.n_obs), None, None, dev)[0]
        self.head.cpu()
        return torch.softmax(logits / self.temperature, -1).numpy(), cache.cls

    # ---- persistence --------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Folder: `annotator.json`, `head.safetensors`, and `encoder/` (unless the encoder is an
        unchanged named model, then only its name is stored)."""
        from cellfm.tasks.annotation_io import save_annotator

        return save_annotator(self, path, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> CellTypeAnnotator:
        from cellfm.tasks.annotation_io import load_annotator

        return load_annotator(cls(), path)


# ---- helpers ----------------------------------------------------------------------------
class _threads_for:
    """One torch thread for the CLS-MLP head: its tiny matmuls lose more to OpenMP hand-offs
    than they gain; the official head's token matmuls keep all threads."""

    def __init__(self, head: Head) -> None:
        self.single = head == "cls_mlp"

    def __enter__(self):
        self.n = torch.get_num_threads()
        if self.single:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)
        return False


def _is_model_object(model) -> bool:
    from cellfm.cellfm import CellFM

    return isinstance(model, CellFM)


def evaluate_annotation(*args, **kwargs) -> dict:
    """See `cellfm.tasks.annotation_eval.evaluate_annotation` (kept here for existing imports)."""
    from cellfm.tasks.annotation_eval import evaluate_annotation as run

    return run(*args, **kwargs)
