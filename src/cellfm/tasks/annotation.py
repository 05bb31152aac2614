"""Cell type annotation: a classifier on CellFM cell embeddings, with calibration and open-set
rejection.

`CellTypeAnnotator` is the user object (scvi-tools style): `fit` on a labelled reference,
`predict` on a query (writes `obs["cellfm_label"]`, `obs["cellfm_confidence"]`), `save`/`load`.
Three training modes, as in the official CellAnnotation tutorial:
- "frozen": the encoder is fixed; CLS embeddings are computed once and only the head trains.
- "lora": LoRA adapters (rank `lora_rank`) in every encoder projection + the head; the base weights
  stay frozen (the official `freeze_module(..., ["lora"])`).
- "full": every encoder parameter trains with the head.
Recipe after the tutorial: Adam, weight decay 1e-5, encoder lr 1e-4, class-weighted cross-entropy;
here with a validation split, early stopping on validation loss and temperature scaling on it.

Open set: a query cell is "unknown" when its calibrated confidence is below `threshold`, or when its
embedding is farther from the nearest reference class centroid than 99 % of reference cells are.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from cellfm.tasks.annotation_head import AnnotationHead, fit_temperature
from cellfm.tasks.benchmark_data import UNLABELLED

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM

log = logging.getLogger(__name__)
Mode = Literal["frozen", "lora", "full"]
UNKNOWN = "unknown"


class CellTypeAnnotator:
    """Cell type classifier on top of a CellFM encoder.

    Examples
    --------
    >>> ann = CellTypeAnnotator().fit(ref, "cell_type", model=cellfm.load("cellfm-mini"))
    >>> ann.predict(query)                 # query.obs["cellfm_label"], ["cellfm_confidence"]
    >>> ann.save("annotator/"); ann = CellTypeAnnotator.load("annotator/")
    """

    def __init__(self) -> None:
        self.encoder: CellFM | None = None
        self.encoder_source: str | None = None  # name/path of an unchanged (frozen) encoder
        self.head: AnnotationHead | None = None
        self.classes: list[str] = []
        self.settings: dict = {}
        self.temperature = 1.0
        self.threshold = 0.5
        self.centroids: np.ndarray | None = None  # (C, D) in standardised embedding space
        self.emb_mean: np.ndarray | None = None
        self.emb_std: np.ndarray | None = None
        self.distance_cutoff = float("inf")
        self.reference_genes: list[str] = []
        self.history: list[dict] = []

    # ---- training -----------------------------------------------------------------------
    def fit(
        self,
        adata: ad.AnnData,
        label_key: str,
        *,
        model: CellFM | str | Path = "cellfm-mini",
        mode: Mode = "frozen",
        val_fraction: float = 0.1,
        max_epochs: int | None = None,
        patience: int = 5,
        batch_size: int = 32,
        lr: float | None = None,
        head_lr: float = 1e-3,
        lora_rank: int = 8,
        class_weights: bool = True,
        min_cells_per_class: int = 5,
        threshold: float = 0.5,
        device: str | torch.device | None = "cpu",
        seed: int = 0,
        progress: bool = True,
    ) -> CellTypeAnnotator:
        """Train on the labelled cells of `adata` (raw counts in X) with labels in `obs[label_key]`.

        Classes with fewer than `min_cells_per_class` cells are dropped with a warning; cells
        labelled "?", "unknown" or empty are ignored. `max_epochs` defaults to 100 (frozen) or 10.
        """
        from cellfm.embedding import resolve_device, resolve_model

        if mode not in ("frozen", "lora", "full"):
            raise ValueError(f"mode must be 'frozen', 'lora' or 'full', not {mode!r}")
        if not 0 < val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
        labels = _checked_labels(adata, label_key, min_cells_per_class)
        keep = labels.notna().to_numpy()
        ref = adata[keep].copy() if not keep.all() else adata
        y_str = labels[keep].astype(str).to_numpy()
        self.classes = sorted(np.unique(y_str).tolist())
        y = np.searchsorted(self.classes, y_str)
        n_cls = len(self.classes)

        dev = resolve_device(device)
        base = resolve_model(model)
        self.encoder_source = str(model) if not _is_model_object(model) and mode == "frozen" else None
        self.reference_genes = _matched_genes(ref, base)
        max_epochs = max_epochs if max_epochs is not None else (100 if mode == "frozen" else 10)
        lr = lr if lr is not None else 1e-4
        self.threshold = threshold
        self.settings = dict(
            label_key=label_key,
            mode=mode,
            val_fraction=val_fraction,
            max_epochs=max_epochs,
            patience=patience,
            batch_size=batch_size,
            lr=lr,
            head_lr=head_lr,
            lora_rank=lora_rank if mode == "lora" else 0,
            class_weights=class_weights,
            min_cells_per_class=min_cells_per_class,
            seed=seed,
        )

        train_idx, val_idx = _stratified_split(y, val_fraction, seed)
        counts = np.bincount(y[train_idx], minlength=n_cls)
        weight = torch.tensor(len(train_idx) / (n_cls * np.maximum(counts, 1)), dtype=torch.float32)
        loss_fn = nn.CrossEntropyLoss(weight=weight.to(dev) if class_weights else None)
        torch.manual_seed(seed)
        self.head = AnnotationHead(base.config.d_model, n_cls).to(dev)

        emb = _embed(ref, base, dev, progress)
        self.head.set_input_scale(torch.from_numpy(emb[train_idx]).to(dev))
        if mode == "frozen":
            self.encoder = base
            self._train_frozen(
                emb,
                y,
                train_idx,
                val_idx,
                loss_fn,
                max_epochs,
                patience,
                batch_size,
                head_lr,
                dev,
                seed,
                progress,
            )
        else:
            self.encoder = _trainable_copy(base, mode, lora_rank)
            # linear-probe-then-fine-tune (Kumar et al. 2022): a head fitted on the frozen
            # embeddings first, so early encoder updates follow a sensible head instead of a random
            # one; the fine-tuning below keeps this state unless it lowers the validation loss
            self._train_frozen(
                emb, y, train_idx, val_idx, loss_fn, 100, patience, batch_size, head_lr, dev, seed, progress
            )
            self._train_encoder(
                ref,
                y,
                train_idx,
                val_idx,
                loss_fn,
                max_epochs,
                patience,
                batch_size,
                lr,
                lr,  # the warm head moves at the encoder's pace (the official recipe: one lr)
                dev,
                seed,
                progress,
            )
            emb = _embed(ref, self.encoder, dev, progress)

        # calibration on the validation cells, open-set statistics on all reference cells
        self.head.cpu().eval()
        with torch.no_grad():
            val_logits = self.head(torch.from_numpy(emb[val_idx]))
        self.temperature = fit_temperature(val_logits, torch.from_numpy(y[val_idx]))
        self._fit_centroids(emb, y)
        return self

    def _train_frozen(
        self, emb, y, train_idx, val_idx, loss_fn, max_epochs, patience, batch_size, lr, dev, seed, progress
    ) -> None:
        X = torch.from_numpy(emb).to(dev)
        Y = torch.from_numpy(y).long().to(dev)
        opt = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed)
        bs = max(batch_size, 64)  # the head alone is cheap; larger batches settle faster

        def epoch() -> float:
            self.head.train()
            order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=gen)]
            for a in range(0, len(order), bs):
                rows = order[a : a + bs].to(dev)
                opt.zero_grad()
                loss_fn(self.head(X[rows]), Y[rows]).backward()
                opt.step()
            self.head.eval()
            with torch.no_grad():
                v = torch.from_numpy(val_idx).to(dev)
                return float(loss_fn(self.head(X[v]), Y[v]))

        with _single_thread():  # tiny matmuls: OpenMP hand-offs cost more than they save
            self._early_stopping(epoch, [self.head], max_epochs, patience, progress)

    def _train_encoder(
        self,
        ref,
        y,
        train_idx,
        val_idx,
        loss_fn,
        max_epochs,
        patience,
        batch_size,
        lr,
        head_lr,
        dev,
        seed,
        progress,
    ) -> None:
        module = self.encoder.module.to(dev)
        enc_params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.Adam(
            [
                {"params": enc_params, "lr": lr, "weight_decay": 1e-5},
                {"params": self.head.parameters(), "lr": head_lr, "weight_decay": 1e-5},
            ]
        )
        train_batches = _token_batches(ref[train_idx].copy(), self.encoder, batch_size, seed)
        val_batches = _token_batches(ref[val_idx].copy(), self.encoder, batch_size, seed)
        y_train, y_val = torch.from_numpy(y[train_idx]).long(), torch.from_numpy(y[val_idx]).long()
        rng = np.random.default_rng(seed)

        def logits_of(batch):
            states, _ = module.encode(batch.gene_ids, batch.values, batch.token_mask)
            return self.head(states[:, 0])  # CLS (B, D) -> (B, C)

        def epoch() -> float:
            module.train()
            self.head.train()
            for i in rng.permutation(len(train_batches)):
                b = train_batches[i].to(dev)
                opt.zero_grad()
                loss_fn(logits_of(b), y_train[b.cell_index.cpu()].to(dev)).backward()
                opt.step()
            return val_loss()

        def val_loss() -> float:
            module.eval()
            self.head.eval()
            total, n = 0.0, 0
            with torch.no_grad():
                for b in val_batches:
                    b = b.to(dev)
                    total += float(loss_fn(logits_of(b), y_val[b.cell_index.cpu()].to(dev))) * len(b)
                    n += len(b)
            return total / max(n, 1)

        self._early_stopping(epoch, [self.head, module], max_epochs, patience, progress, initial=val_loss)
        module.cpu().eval()
        if self.encoder.config.lora_rank:
            module.merge_lora()  # same outputs, plain linear cost, plain checkpoint keys
            self.encoder.config = self.encoder.config.replace(lora_rank=0)
            module.config = self.encoder.config

    def _early_stopping(
        self, epoch_fn, modules: list[nn.Module], max_epochs: int, patience: int, progress: bool, initial=None
    ) -> None:
        """Run epochs until the validation loss stops improving; keep the best state (which, with
        `initial`, may be the state before the first epoch)."""
        from tqdm.auto import trange

        best, best_state, waited = float("inf"), None, 0
        if initial is not None:
            best = initial()
            best_state = [copy.deepcopy(m.state_dict()) for m in modules]
            self.history.append({"epoch": 0, "val_loss": best, "phase": "fine-tune start"})
        else:
            self.history = []
        bar = trange(max_epochs, desc=f"annotate fit ({self.settings['mode']})", disable=not progress)
        for ep in bar:
            val_loss = epoch_fn()
            self.history.append({"epoch": ep + 1, "val_loss": val_loss})
            bar.set_postfix(val_loss=f"{val_loss:.4f}")
            if val_loss < best - 1e-4:
                best, waited = val_loss, 0
                best_state = [copy.deepcopy(m.state_dict()) for m in modules]
            else:
                waited += 1
                if waited >= patience:
                    break
        bar.close()
        if best_state is not None:
            for m, s in zip(modules, best_state, strict=True):
                m.load_state_dict(s)

    def _fit_centroids(self, emb: np.ndarray, y: np.ndarray) -> None:
        self.emb_mean, self.emb_std = emb.mean(0), emb.std(0) + 1e-6
        z = (emb - self.emb_mean) / self.emb_std
        self.centroids = np.stack([z[y == c].mean(0) for c in range(len(self.classes))])
        self.distance_cutoff = float(np.quantile(_nearest_distance(z, self.centroids), 0.99))

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
        "unknown") and `obs["cellfm_centroid_distance"]` (distance to the nearest type centroid
        divided by the reference's 99th percentile; > 1 means unlike the reference).
        """
        from cellfm.embedding import resolve_device

        if self.head is None or self.encoder is None:
            raise RuntimeError("this CellTypeAnnotator is not fitted: call fit() or CellTypeAnnotator.load()")
        threshold = self.threshold if threshold is None else threshold
        genes = set(_matched_genes(adata, self.encoder))
        shared = len(genes & set(self.reference_genes))
        if shared == 0:
            raise ValueError(
                f"none of the {len(self.reference_genes)} reference genes is in the query "
                f"(query genes e.g. {list(adata.var_names[:5])}); query and reference need the same gene "
                "identifiers (symbols or Ensembl ids)"
            )
        if shared < 0.5 * len(self.reference_genes):
            warnings.warn(
                f"the query shares only {shared} of the {len(self.reference_genes)} reference "
                "genes; predictions may be unreliable",
                stacklevel=2,
            )
        emb = _embed(adata, self.encoder, resolve_device(device), progress)
        with torch.no_grad():
            self.head.eval()
            probs = torch.softmax(self.head(torch.from_numpy(emb)) / self.temperature, -1).numpy()
        best = probs.argmax(1)
        conf = probs.max(1)
        dist = _nearest_distance((emb - self.emb_mean) / self.emb_std, self.centroids) / self.distance_cutoff
        closed = np.asarray(self.classes, dtype=object)[best]
        label = closed.copy()
        if open_set:
            label[(conf < threshold) | (dist > 1.0)] = UNKNOWN
        cats = [*self.classes, UNKNOWN]
        adata.obs["cellfm_label"] = pd.Categorical(label, categories=cats)
        adata.obs["cellfm_label_closed_set"] = pd.Categorical(closed, categories=self.classes)
        adata.obs["cellfm_confidence"] = conf.astype(np.float32)
        adata.obs["cellfm_centroid_distance"] = dist.astype(np.float32)

    def predict_proba(self, adata: ad.AnnData, device: str | torch.device | None = "cpu") -> pd.DataFrame:
        """Calibrated class probabilities (n_cells, n_classes) as a DataFrame."""
        from cellfm.embedding import resolve_device

        emb = _embed(adata, self.encoder, resolve_device(device), False)
        with torch.no_grad():
            p = torch.softmax(self.head(torch.from_numpy(emb)) / self.temperature, -1).numpy()
        return pd.DataFrame(p, index=adata.obs_names, columns=self.classes)

    # ---- persistence --------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Folder: `annotator.json`, `head.safetensors`, and `encoder/` (unless the encoder is an
        unchanged named model, then only its name is stored)."""
        from safetensors.torch import save_file

        if self.head is None:
            raise RuntimeError("nothing to save: the annotator is not fitted")
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} is not empty; pass overwrite=True to replace it")
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": 1,
            "classes": self.classes,
            "settings": self.settings,
            "temperature": self.temperature,
            "threshold": self.threshold,
            "distance_cutoff": self.distance_cutoff,
            "reference_genes": self.reference_genes,
            "encoder_source": self.encoder_source,
            "history": self.history,
            "head": {"d_model": self.head.class_emb.shape[1], "hidden": self.head.mlp[0].out_features},
        }
        (path / "annotator.json").write_text(json.dumps(meta, indent=1) + "\n")
        tensors = {f"head.{k}": v.contiguous() for k, v in self.head.state_dict().items()}
        tensors.update(
            centroids=torch.from_numpy(self.centroids),
            emb_mean=torch.from_numpy(self.emb_mean),
            emb_std=torch.from_numpy(self.emb_std),
        )
        save_file(tensors, str(path / "head.safetensors"))
        if self.encoder_source is None:
            self.encoder.save(path / "encoder", overwrite=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CellTypeAnnotator:
        from safetensors.torch import load_file

        from cellfm.cellfm import CellFM, load

        path = Path(path)
        if not (path / "annotator.json").is_file():
            raise FileNotFoundError(f"{path} is not a saved CellTypeAnnotator (annotator.json is missing)")
        meta = json.loads((path / "annotator.json").read_text())
        self = cls()
        self.classes, self.settings = meta["classes"], meta["settings"]
        self.temperature, self.threshold = meta["temperature"], meta["threshold"]
        self.distance_cutoff, self.reference_genes = meta["distance_cutoff"], meta["reference_genes"]
        self.encoder_source, self.history = meta["encoder_source"], meta.get("history", [])
        t = load_file(str(path / "head.safetensors"))
        self.head = AnnotationHead(meta["head"]["d_model"], len(self.classes), hidden=meta["head"]["hidden"])
        self.head.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("head.")})
        self.head.eval()
        self.centroids, self.emb_mean, self.emb_std = (
            t[k].numpy() for k in ("centroids", "emb_mean", "emb_std")
        )
        self.encoder = (
            CellFM.load(path / "encoder") if self.encoder_source is None else load(self.encoder_source)
        )
        return self


# ---- helpers ----------------------------------------------------------------------------
def _checked_labels(adata: ad.AnnData, label_key: str, min_cells: int) -> pd.Series:
    """Labels as strings, NaN where unlabelled or in a class too small to learn."""
    if label_key not in adata.obs.columns:
        raise KeyError(
            f"label column {label_key!r} is not in adata.obs (columns: {list(adata.obs.columns)}); "
            "pass --label-key / label_key= with the column holding cell types"
        )
    labels = adata.obs[label_key].astype(object)
    labels = labels.where(labels.notna() & ~labels.astype(str).isin(UNLABELLED))
    counts = labels.value_counts()
    small = counts[counts < min_cells]
    if len(small):
        warnings.warn(
            f"dropping {len(small)} classes with fewer than {min_cells} cells: "
            f"{dict(small)} (lower min_cells_per_class to keep them)",
            stacklevel=3,
        )
        labels = labels.where(~labels.isin(small.index))
    n = labels.nunique()
    if n < 2:
        raise ValueError(
            f"obs[{label_key!r}] has {n} class(es) with at least {min_cells} cells; "
            "annotation needs at least 2"
        )
    return labels.astype(object)


def _stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    n_cls = int(y.max()) + 1
    n_val = max(n_cls, int(round(val_fraction * len(y))))
    tr, va = train_test_split(np.arange(len(y)), test_size=n_val, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(va)


def _matched_genes(adata: ad.AnnData, model: CellFM) -> list[str]:
    from cellfm.vocab import map_genes

    names = pd.Index(adata.var_names.astype(str))
    ids = np.asarray(map_genes(names, model.vocab).token_ids)
    genes = [model.vocab.genes[i - 1] for i in ids if i > 0]
    if not genes:
        raise ValueError(
            f"none of the {len(names)} genes (e.g. {list(names[:5])}) matches the model "
            f"vocabulary {model.vocab.name!r}; use human gene symbols or Ensembl ids"
        )
    return sorted(set(genes))


def _embed(adata: ad.AnnData, model: CellFM, device: torch.device, progress: bool) -> np.ndarray:
    from cellfm.embedding import embed

    out = embed(adata, model, device=device, copy=True, progress=progress, empty="zero")
    return np.asarray(out.obsm["X_cellfm"], dtype=np.float32)  # (N, D)


def _token_batches(adata: ad.AnnData, model: CellFM, batch_size: int, seed: int) -> list:
    """Tokenize once; cell_index of each batch = row in `adata`."""
    from cellfm.tokenizer import iter_token_batches
    from cellfm.vocab import map_genes

    mapping = map_genes(pd.Index(adata.var_names.astype(str)), model.vocab)
    return list(
        iter_token_batches(adata, mapping, batch_size=batch_size, max_genes=model.config.max_genes, seed=seed)
    )


def _trainable_copy(base: CellFM, mode: str, lora_rank: int) -> CellFM:
    """A copy of the encoder with the parameters of `mode` trainable (the base model is untouched)."""
    from cellfm.cellfm import CellFM
    from cellfm.model import CellFMModule

    if mode == "full":
        module = copy.deepcopy(base.module)
        for p in module.parameters():
            p.requires_grad_(True)
        return CellFM(base.config, module, base.vocab)
    if lora_rank < 1:
        raise ValueError(f"mode='lora' needs lora_rank >= 1, got {lora_rank}")
    config = base.config.replace(lora_rank=lora_rank)
    module = CellFMModule(config)
    missing, unexpected = module.load_state_dict(base.module.state_dict(), strict=False)
    bad = [k for k in missing if "lora_" not in k] + list(unexpected)
    if bad:
        raise ValueError(f"base weights do not fit the LoRA model: {bad[:5]}")
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return CellFM(config, module, base.vocab)


class _single_thread:
    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)
        return False


def _nearest_distance(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d = ((z[:, None, :] - centroids[None]) ** 2).sum(-1)  # (N, C)
    return np.sqrt(d.min(1))


def _is_model_object(model) -> bool:
    from cellfm.cellfm import CellFM

    return isinstance(model, CellFM)


def evaluate_annotation(
    adata: ad.AnnData,
    label_key: str,
    model: CellFM | str | Path,
    *,
    mode: Mode = "frozen",
    test_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs,
) -> dict:
    """Stratified held-out split; CellFM annotator vs logistic regression on HVG+PCA and kNN on PCA.

    Returns a dict with a `table` (DataFrame: method, accuracy, macro_f1), the test labels and every
    method's predictions (for a confusion matrix), and the annotator's rejection rate.
    """
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import train_test_split

    from cellfm.tasks.baselines import pca_knn, pca_logistic_regression

    labels = _checked_labels(adata, label_key, min_cells=fit_kwargs.get("min_cells_per_class", 5))
    keep = np.flatnonzero(labels.notna().to_numpy())
    y = labels.iloc[keep].astype(str).to_numpy()
    tr, te = train_test_split(keep, test_size=test_fraction, stratify=y, random_state=seed)
    tr, te = np.sort(tr), np.sort(te)
    train, test = adata[tr].copy(), adata[te].copy()
    y_tr, y_te = labels.iloc[tr].astype(str).to_numpy(), labels.iloc[te].astype(str).to_numpy()

    ann = CellTypeAnnotator().fit(
        train, label_key, model=model, mode=mode, seed=seed, progress=progress, **fit_kwargs
    )
    ann.predict(test, progress=progress)
    preds = {
        f"CellFM ({mode})": test.obs["cellfm_label_closed_set"].astype(str).to_numpy(),
        "logreg HVG+PCA": pca_logistic_regression(train.X, y_tr, test.X, seed=seed),
        "kNN PCA": pca_knn(train.X, y_tr, test.X, seed=seed),
    }
    rows = [
        {"method": m, "accuracy": accuracy_score(y_te, p), "macro_f1": f1_score(y_te, p, average="macro")}
        for m, p in preds.items()
    ]
    accepted = test.obs["cellfm_label"].astype(str).to_numpy() != UNKNOWN
    return {
        "table": pd.DataFrame(rows),
        "y_true": y_te,
        "predictions": preds,
        "rejected_fraction": float(1 - accepted.mean()),
        "accuracy_on_accepted": float((y_te[accepted] == preds[f"CellFM ({mode})"][accepted]).mean())
        if accepted.any()
        else float("nan"),
        "temperature": ann.temperature,
        "n_train": len(tr),
        "n_test": len(te),
    }
