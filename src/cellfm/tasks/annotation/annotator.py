"""`CellTypeAnnotator`: cell type annotation on a CellFM encoder, the user object.

    ann = CellTypeAnnotator(cellfm.load("cellfm-mini"), AnnotatorConfig(head="auto"))
    ann.fit(reference, "cell_type")            # layer= / use_raw= / gene_key= as in `embed`
    ann.predict(query, key_added="cellfm")     # obs["cellfm_label"], uns["cellfm_annotation"]
    ann.save("annotator/"); ann = CellTypeAnnotator.load("annotator/")

Cells are read only through `cellfm.contract.setup_cells` (the count, gene and empty-cell checks
of `embed`). Heads (`cellfm.model`, one interface): the authors' `CellTypeHead`, a linear and an
MLP head on the CLS; `head="auto"` keeps the better on held-out reference cells (`selection`).
Modes: "frozen" (encoder outputs cached once), "lora", "full" (head first, then jointly).
Then temperature scaling and the rejection rule are calibrated on the held-out cells (`open_set`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from cellfm.cellfm import CellFM
from cellfm.contract.setup import setup_cells
from cellfm.embedding.engine import resolve_device
from cellfm.embedding.memory import as_model
from cellfm.model.annotation_head import AnnotationHead
from cellfm.tasks.annotation.calibration import fit_temperature
from cellfm.tasks.annotation.config import AnnotatorConfig
from cellfm.tasks.annotation.open_set import OpenSetRule, calibrate_open_set
from cellfm.tasks.annotation.persist import load_parts, save_parts
from cellfm.tasks.annotation.reference import (
    checked_labels,
    st_encoder,
    token_batches,
    trainable_copy,
    validation_split,
)
from cellfm.tasks.annotation.selection import candidate_heads, choose_head, refit_linear_head, train_head
from cellfm.tasks.annotation.states import TokenStates
from cellfm.tasks.annotation.training import encoder_epoch_fn, evaluate_cached, train_with_early_stopping

log = logging.getLogger(__name__)
UNKNOWN = "unknown"


class CellTypeAnnotator:
    """Cell type classifier on a CellFM encoder (scvi-tools style: model and config first).

    Parameters
    ----------
    model
        A `CellFM`, or a name / path for `cellfm.load`.
    config
        `AnnotatorConfig` (default settings when None).

    After `fit`: `classes`, `head` (an `AnnotationHead`), `settings` (what ran: the config, the
    head kept and the selection scores), `history` (per epoch), `stops` (why each phase stopped),
    `temperature`, `open_set` (the rejection rule).
    """

    def __init__(self, model: CellFM | str | Path, config: AnnotatorConfig | None = None) -> None:
        self.config = config or AnnotatorConfig()
        self.encoder: CellFM = as_model(model)
        # a frozen, named encoder is saved by name only
        self.encoder_source = None if isinstance(model, CellFM) else str(model)
        self.head: AnnotationHead | None = None
        self.classes: list[str] = []
        self.settings: dict = {}
        self.temperature = 1.0
        self.open_set: OpenSetRule | None = None
        self.reference_genes: list[str] = []
        self.history: list[dict] = []
        self.stops: list[dict] = []

    @property
    def threshold(self) -> float:
        return self.open_set.threshold if self.open_set is not None else float("nan")

    # ---- training -----------------------------------------------------------------------
    def fit(
        self,
        adata: ad.AnnData,
        label_key: str,
        *,
        layer: str | None = None,
        use_raw: bool = False,
        gene_key: str | None = None,
    ) -> CellTypeAnnotator:
        """Train on the labelled cells of `adata` (raw counts in X, `layers[layer]` or `.raw`),
        labels in `obs[label_key]`. Unlabelled cells (`cellfm.contract.labels`) are ignored; classes
        with fewer than `min_cells_per_class` cells are dropped with a warning."""
        cfg = self.config
        read = dict(layer=layer, use_raw=use_raw, gene_key=gene_key)
        cells = setup_cells(adata, self.encoder, empty="zero", seed=cfg.seed, **read)  # the input first
        labels = checked_labels(adata, label_key, cfg.min_cells_per_class)
        keep = labels.notna().to_numpy()
        ref = adata if keep.all() else adata[keep]
        y_str = labels[keep].astype(str).to_numpy()
        self.classes = sorted(np.unique(y_str).tolist())
        y = np.searchsorted(self.classes, y_str)
        n_cls = len(self.classes)
        dev = resolve_device(cfg.device)

        base, st_weights = self.encoder, None
        if cfg.st_tokens:
            torch.manual_seed(cfg.seed)  # new ST weights, if any, are reproducible
            base, st_weights = st_encoder(base, cfg.mode)
        if cfg.mode != "frozen" or base is not self.encoder:
            self.encoder_source = None
        if ref is not adata:  # the labelled cells only
            cells = setup_cells(ref, base, empty="zero", seed=cfg.seed, **read)
        self.reference_genes = sorted(set(cells.mapping.names[cells.mapping.token_ids > 0].astype(str)))
        split = validation_split(y, cfg.val_fraction, cfg.min_val_cells, cfg.seed)
        train_idx, val_idx = split
        counts = np.bincount(y[train_idx], minlength=n_cls)
        weight = torch.tensor(len(train_idx) / (n_cls * np.maximum(counts, 1)), dtype=torch.float32)
        weight = weight if cfg.class_weights else None
        self.history, self.stops = [], []

        kinds = candidate_heads(cfg)
        cache = TokenStates.compute(cells, base, dev, keep_tokens=any(k == "official" for k in kinds),
                                    progress=cfg.progress, desc="cellfm encode reference",
                                    st_tokens=cfg.st_tokens)
        heads = {}
        for kind in kinds:
            heads[kind], stop = train_head(kind, base.config, n_cls, cache, y, split, weight, cfg, dev,
                                           self.history)
            self.stops.append(stop)
        chosen, selection = choose_head(heads, cache, y, val_idx, cfg.selection_margin)
        if len(kinds) > 1:
            log.info("annotate: head %s kept (%s: %s)", chosen, selection["criterion"],
                     ", ".join(f"{k} {v:.3f}" for k, v in selection["scores"].items()))
        self.head = heads[chosen]
        val_logits = self._logits(cache, val_idx)  # of the head that never saw the validation cells
        if chosen == "cls_linear":  # no epochs to pick: refit on every reference cell, as the baseline
            self.head = refit_linear_head(self.head, cache.cls, y, cfg)
        selection["refit_on_all_reference_cells"] = chosen == "cls_linear"
        self.settings = {**cfg.to_dict(), "label_key": label_key, "head": chosen, "head_selection": selection,
                         "st_weights": st_weights or "", "n_reference": int(len(y)),
                         "n_validation": int(len(val_idx)), "input": cells.record}
        self.encoder = base
        if cfg.mode != "frozen":
            self.encoder = trainable_copy(base, cfg.mode, cfg.lora_rank, train_st=cfg.st_tokens)
            self._train_encoder(ref, y, split, weight, dev, read)
            cache = TokenStates.compute(setup_cells(ref, self.encoder, empty="zero", seed=cfg.seed, **read),
                                        self.encoder, dev, keep_tokens=self.head.reads_tokens,
                                        progress=cfg.progress, desc="cellfm encode reference",
                                        st_tokens=cfg.st_tokens)
            val_logits = self._logits(cache, val_idx)
        self._calibrate(cache, y, split, val_logits)
        return self

    def _train_encoder(self, ref, y, split, weight, dev, read) -> None:
        cfg = self.config
        train_idx, val_idx = split
        module = self.encoder.module.to(dev)
        self.head.to(dev)
        train_batches = token_batches(ref[train_idx], self.encoder, cfg.batch_size, cfg.seed, **read)
        val_batches = token_batches(ref[val_idx], self.encoder, cfg.batch_size, cfg.seed, **read)
        y_train, y_val = torch.from_numpy(y[train_idx]).long(), torch.from_numpy(y[val_idx]).long()
        # the warm head moves at the encoder's pace (official recipe: one learning rate)
        epoch, validate = encoder_epoch_fn(module, self.head, train_batches, val_batches, y_train, y_val,
                                           weight, cfg.lr, cfg.lr, dev, cfg.seed, st_tokens=cfg.st_tokens)
        self.stops.append(train_with_early_stopping(
            epoch, [self.head, module], max_epochs=cfg.max_epochs or 10, patience=cfg.patience,
            phase=f"{cfg.mode} fine-tune", history=self.history, smoothing=cfg.smoothing,
            progress=cfg.progress, initial=validate,
        ))
        module.cpu().eval()
        if self.encoder.config.lora_rank:
            module.merge_lora()  # same outputs, plain linear cost, plain checkpoint keys
            self.encoder.config = self.encoder.config.replace(lora_rank=0)
            module.config = self.encoder.config

    def _logits(self, cache: TokenStates, rows: np.ndarray) -> torch.Tensor:
        self.head.cpu().eval()
        return evaluate_cached(self.head, cache, rows, None, None, torch.device("cpu"))[0]

    def _calibrate(self, cache: TokenStates, y: np.ndarray, split, val_logits: torch.Tensor) -> None:
        """Temperature and rejection cut-offs from the held-out (validation) cells."""
        train_idx, val_idx = split
        self.temperature = fit_temperature(val_logits, torch.from_numpy(y[val_idx]).long())
        conf_val = torch.softmax(val_logits / self.temperature, -1).max(1).values.numpy()
        self.open_set = calibrate_open_set(cache.cls[train_idx], y[train_idx], len(self.classes),
                                           cache.cls[val_idx], conf_val, self.config.threshold,
                                           self.config.max_rejected)
        log.info("annotate: the rejection rule calls %.1f%% of held-out reference cells unknown "
                 "(confidence < %.3f or centroid distance > %.3f)", 100 * self.open_set.reference_rejected,
                 self.open_set.threshold, self.open_set.distance_cutoff)

    @classmethod
    def from_parts(
        cls,
        encoder: CellFM,
        head: AnnotationHead,
        classes: list[str],
        config: AnnotatorConfig | None = None,
        *,
        reference: ad.AnnData | None = None,
        label_key: str | None = None,
        **read,
    ) -> CellTypeAnnotator:
        """An annotator from an encoder and a head trained elsewhere (an official annotation
        checkpoint: `cellfm.tasks.annotation.official`); `classes[i]` names the head's logit i.
        With a labelled `reference` (`read`: layer / use_raw / gene_key) the temperature and the
        rejection rule are calibrated on its cells of those classes; without, nothing is rejected."""
        if head.n_classes != len(classes):
            raise ValueError(f"the head scores {head.n_classes} cell types but {len(classes)} names were "
                             "given")
        ann = cls(encoder, config)
        ann.head, ann.classes = head.eval(), [str(c) for c in classes]
        ann.settings = {**ann.config.to_dict(), "head": head.kind, "head_selection": {}, "mode": "frozen",
                        "label_key": label_key or "", "st_weights": ""}
        d = encoder.config.d_model
        ann.open_set = OpenSetRule(np.zeros(d, np.float32), np.ones(d, np.float32),
                                   np.zeros((len(classes), d), np.float32), float("inf"), 0.0, 0.0)
        if reference is None:
            return ann
        labels = reference.obs[label_key].astype(str)
        rows = np.flatnonzero(labels.isin(ann.classes).to_numpy())
        if len(rows) == 0:
            raise ValueError(f"no cell of obs[{label_key!r}] is of one of the head's types "
                             f"({ann.classes[:5]}...)")
        cells = setup_cells(reference[rows], encoder, empty="zero", seed=ann.config.seed, **read)
        ann.reference_genes = sorted(set(cells.mapping.names[cells.mapping.token_ids > 0].astype(str)))
        cache = TokenStates.compute(cells, encoder, resolve_device(ann.config.device),
                                    keep_tokens=head.reads_tokens, progress=ann.config.progress,
                                    desc="cellfm encode reference", st_tokens=ann.config.st_tokens)
        index = {c: i for i, c in enumerate(ann.classes)}
        y = np.array([index[v] for v in labels.to_numpy()[rows]])
        every = np.arange(len(rows))  # centroids and cut-offs from the same cells: no held-out set here
        ann._calibrate(cache, y, (every, every), ann._logits(cache, every))
        return ann

    # ---- inference ----------------------------------------------------------------------
    def predict(
        self,
        adata: ad.AnnData,
        *,
        key_added: str = "cellfm",
        threshold: float | None = None,
        reject: bool = True,
        layer: str | None = None,
        use_raw: bool = False,
        gene_key: str | None = None,
    ) -> None:
        """Label the cells of `adata` in place (scanpy style).

        Writes `obs[f"{key_added}_label"]` (a reference type, or "unknown" when rejected),
        `obs[f"{key_added}_confidence"]` (calibrated max probability), `..._label_closed_set`
        (the most likely type, never "unknown"), `..._centroid_distance` (to the nearest type
        centroid, in units of the calibrated cut-off: > 1 is unlike the reference) and
        `uns[f"{key_added}_annotation"]`: the unknown share overall and per predicted class, the
        cut-offs, the head and how it was chosen. `threshold` overrides the calibrated minimum
        confidence; `reject=False` labels every cell with its most likely type.
        """
        probs, emb, record = self._probabilities(adata, dict(layer=layer, use_raw=use_raw, gene_key=gene_key))
        rule = self.open_set
        threshold = rule.threshold if threshold is None else float(threshold)
        best, conf = probs.argmax(1), probs.max(1)
        dist = rule.distance(emb)
        closed = np.asarray(self.classes, dtype=object)[best]
        low, far = (conf < threshold) & reject, (dist > 1.0) & reject
        rejected = low | far
        label = np.where(rejected, UNKNOWN, closed)
        adata.obs[f"{key_added}_label"] = pd.Categorical(label, categories=[*self.classes, UNKNOWN])
        adata.obs[f"{key_added}_label_closed_set"] = pd.Categorical(closed, categories=self.classes)
        adata.obs[f"{key_added}_confidence"] = conf.astype(np.float32)
        adata.obs[f"{key_added}_centroid_distance"] = dist.astype(np.float32)
        seen = [c for c in self.classes if (closed == c).any()]  # lists, not a dict: h5ad keys can't hold "/"
        by_class = {"classes": seen, "rejected_fraction": [float(rejected[closed == c].mean()) for c in seen]}
        adata.uns[f"{key_added}_annotation"] = {
            "rejected_fraction": float(rejected.mean()),
            "n_rejected": int(rejected.sum()),
            "rejected_low_confidence": int(low.sum()),
            "rejected_far_from_reference": int(far.sum()),
            "rejected_fraction_by_predicted_class": by_class,
            "reject": bool(reject),
            "threshold": threshold,
            "distance_cutoff": rule.distance_cutoff,
            "reference_rejected_fraction": rule.reference_rejected,
            "head": self.settings.get("head", ""),
            "head_selection": self.settings.get("head_selection") or {},
            "mode": self.settings.get("mode", ""),
            "input": record,
        }

    def predict_proba(self, adata: ad.AnnData, **read) -> pd.DataFrame:
        """Calibrated class probabilities (n_cells, n_classes); `read`: layer / use_raw / gene_key."""
        return pd.DataFrame(self._probabilities(adata, read, progress=False)[0], index=adata.obs_names,
                            columns=self.classes)

    def _probabilities(self, adata, read: dict, progress: bool | None = None):
        """(calibrated probabilities (N, C), CLS embeddings (N, D), the input record)."""
        if self.head is None:
            raise RuntimeError("this CellTypeAnnotator is not fitted: call fit() or CellTypeAnnotator.load()")
        cells = setup_cells(adata, self.encoder, empty="zero", seed=self.config.seed, **read)
        genes = set(cells.mapping.names[cells.mapping.token_ids > 0].astype(str))
        shared = len(genes & set(self.reference_genes))
        if self.reference_genes:  # read the query through the reference's genes: a query measuring
            # more genes (a whole transcriptome against a reference of 2,000 HVGs) would otherwise
            # land far from every reference type and be called unknown
            keep = np.isin(cells.mapping.names.astype(str), self.reference_genes)
            cells.mapping = replace(cells.mapping, token_ids=np.where(keep, cells.mapping.token_ids, 0))
        if shared == 0 and self.reference_genes:
            raise ValueError(
                f"none of the {len(self.reference_genes)} reference genes is in the query (query genes e.g. "
                f"{list(cells.mapping.names[:5])}); query and reference need the same gene identifiers "
                "(symbols or Ensembl ids)")
        if 0 < shared < 0.5 * len(self.reference_genes):
            warnings.warn(f"the query shares only {shared} of the {len(self.reference_genes)} reference "
                          "genes; predictions may be unreliable", stacklevel=3)
        dev = resolve_device(self.config.device)
        cache = TokenStates.compute(cells, self.encoder, dev, keep_tokens=self.head.reads_tokens,
                                    progress=self.config.progress if progress is None else progress,
                                    desc="cellfm encode query", st_tokens=self.config.st_tokens)
        self.head.to(dev)
        logits = evaluate_cached(self.head, cache, np.arange(cells.n_cells), None, None, dev)[0]
        self.head.cpu()
        return torch.softmax(logits / self.temperature, -1).numpy(), cache.cls, cells.record

    # ---- persistence --------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Folder: `annotator.json`, `head.safetensors`, and `encoder/` unless the encoder is an
        unchanged named model (then only its name is kept)."""
        if self.head is None:
            raise RuntimeError("nothing to save: the annotator is not fitted")
        meta = {"classes": self.classes, "config": self.config.to_dict(), "settings": self.settings,
                "temperature": self.temperature, "reference_genes": self.reference_genes,
                "encoder_source": self.encoder_source, "history": self.history, "stops": self.stops}
        return save_parts(path, meta, self.head, self.open_set,
                          None if self.encoder_source else self.encoder, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> CellTypeAnnotator:
        meta, head, rule, encoder = load_parts(path)
        ann = cls(encoder, AnnotatorConfig.from_dict(meta["config"]))
        ann.encoder_source = meta["encoder_source"]
        ann.head, ann.open_set, ann.classes = head, rule, meta["classes"]
        ann.settings, ann.temperature = meta["settings"], meta["temperature"]
        ann.reference_genes, ann.history, ann.stops = meta["reference_genes"], meta["history"], meta["stops"]
        return ann
