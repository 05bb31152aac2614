"""Training the candidate heads on cached encoder states and keeping the better one.

With `head="auto"` and a frozen encoder both candidates are cheap on the cached states: the
official head (type queries over the gene tokens, trained with early stopping) and a linear head
on the CLS (logistic regression, L-BFGS). Each is scored by macro-F1 on the same stratified
held-out reference cells, which neither trained on; the better one is kept. A linear model on the
encoder's own embedding is the obvious baseline, so the default can not fall far below it.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score

from cellfm.config import ModelConfig
from cellfm.model.annotation_head import AnnotationHead
from cellfm.model.cls_heads import ClsLinearHead
from cellfm.tasks.annotation.config import AnnotatorConfig
from cellfm.tasks.annotation.heads import StandardisedStates, fit_linear_head, new_head
from cellfm.tasks.annotation.states import TokenStates
from cellfm.tasks.annotation.training import evaluate_cached, frozen_epoch_fn, train_with_early_stopping

DEFAULT_EPOCHS = {"official": 40, "cls_mlp": 100, "cls_linear": 0}


def candidate_heads(config: AnnotatorConfig) -> list[str]:
    if config.head != "auto":
        return [config.head]
    return ["official", "cls_linear"] if config.mode == "frozen" else ["official"]


def head_epochs(kind: str, config: AnnotatorConfig) -> int:
    """Epochs of head training on the frozen encoder."""
    if config.max_epochs is not None and config.mode == "frozen":
        return config.max_epochs
    return DEFAULT_EPOCHS[kind]


def train_head(
    kind: str,
    model_config: ModelConfig,
    n_classes: int,
    cache: TokenStates,
    y: np.ndarray,
    split: tuple[np.ndarray, np.ndarray],
    weight: torch.Tensor | None,
    config: AnnotatorConfig,
    device: torch.device,
    history: list[dict],
) -> tuple[AnnotationHead, dict]:
    """A head of `kind` trained on the cached states of the training rows; (head, stop summary)."""
    train_idx, val_idx = split
    torch.manual_seed(config.seed)
    head = new_head(kind, model_config, n_classes)
    if isinstance(head, ClsLinearHead):
        fit_linear_head(head, cache.cls[train_idx], y[train_idx], config.class_weights, config.seed)
        return head, {"phase": "cls_linear head (frozen encoder)", "stopped_early": False, "epochs_run": 0,
                      "best_epoch": 0, "best_val_loss": float("nan"),
                      "reason": "fitted by logistic regression (L-BFGS) on the training cells' CLS"}
    head.prepare(torch.from_numpy(cache.cls[train_idx]))
    if head.reads_tokens and config.standardise_states:
        head = StandardisedStates(head, model_config.d_model)
        head.set_statistics(*cache.feature_stats(train_idx))
    head.to(device)
    # the CLS-only head is cheap per cell: larger batches settle faster
    batch_size = config.batch_size if head.reads_tokens else max(config.batch_size, 64)
    epoch = frozen_epoch_fn(head, cache, y, train_idx, val_idx, weight, config.head_lr, batch_size, device,
                            config.seed)
    with _one_thread_unless(head.reads_tokens):
        stop = train_with_early_stopping(
            epoch, [head], max_epochs=head_epochs(kind, config), patience=config.patience,
            phase=f"{kind} head (frozen encoder)", history=history, smoothing=config.smoothing,
            progress=config.progress,
        )
    return head, stop


def refit_linear_head(head: ClsLinearHead, cls: np.ndarray, y: np.ndarray, config: AnnotatorConfig
                      ) -> ClsLinearHead:
    """The linear head fitted again on all reference cells (training and validation)."""
    return fit_linear_head(head, cls, y, config.class_weights, config.seed)


def val_predictions(head: AnnotationHead, cache: TokenStates, val_idx: np.ndarray) -> np.ndarray:
    """(n_val,) predicted class of each held-out cell."""
    return evaluate_cached(head.cpu(), cache, val_idx, None, None, torch.device("cpu"))[0].argmax(1).numpy()


def choose_head(
    heads: dict[str, AnnotationHead], cache: TokenStates, y: np.ndarray, val_idx: np.ndarray,
    margin: float = 0.0, n_boot: int = 200, seed: int = 0,
) -> tuple[str, dict]:
    """(kind kept, record {scores, chosen, criterion, ...}). The linear head is kept unless another
    beats it by more than `margin` on at least 95 % of paired bootstrap resamples of the held-out
    cells: macro-F1 on a hundred or so cells varies by several points from split to split (one
    margin-only choice kept an official head 0.135 below the linear one), and the linear head is
    then refitted on every reference cell."""
    y_val = y[val_idx]
    preds = {kind: val_predictions(h, cache, val_idx) for kind, h in heads.items()}
    scores = {kind: float(f1_score(y_val, p, average="macro")) for kind, p in preds.items()}
    chosen = max(scores, key=lambda k: scores[k])
    wins = float("nan")  # no challenger to test
    if "cls_linear" in scores and chosen != "cls_linear":
        rng = np.random.default_rng(seed)
        diffs = []
        for _ in range(n_boot):
            i = rng.integers(0, len(y_val), len(y_val))
            diffs.append(f1_score(y_val[i], preds[chosen][i], average="macro")
                         - f1_score(y_val[i], preds["cls_linear"][i], average="macro"))
        wins = float(np.mean(np.asarray(diffs) > margin))
        if wins < 0.95:
            chosen = "cls_linear"
    return chosen, {
        "scores": scores,
        "chosen": chosen,
        "bootstrap_wins": wins,
        "criterion": f"macro-F1 on {len(val_idx)} held-out reference cells (stratified): the linear head "
                     f"unless another beats it by more than {margin:g} on 95 % of {n_boot} paired "
                     "bootstrap resamples",
    }


class _one_thread_unless:
    """One torch thread for CLS-only heads: their tiny matmuls lose more to OpenMP hand-offs than
    they gain; the official head's token matmuls keep all threads."""

    def __init__(self, many: bool) -> None:
        self.single = not many

    def __enter__(self) -> None:
        self.n = torch.get_num_threads()
        if self.single:
            torch.set_num_threads(1)

    def __exit__(self, *exc) -> bool:
        torch.set_num_threads(self.n)
        return False
