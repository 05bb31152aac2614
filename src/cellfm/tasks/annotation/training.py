"""Training loops of the cell type annotator: head epochs on cached encoder states (frozen mode),
joint encoder + head epochs (LoRA / full), and early stopping on a smoothed validation loss that
keeps the best state and says when and why it stopped.

Every epoch is logged (logger `cellfm.tasks.annotation.training`, INFO) and appended to a history
list as {phase, epoch, train_loss, train_acc, val_loss, val_loss_smoothed, val_acc}.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cellfm.model.annotation_head import AnnotationHead
from cellfm.progress import progress_bar
from cellfm.tasks.annotation.states import TokenStates, encoder_states

log = logging.getLogger(__name__)
GRAD_CLIP_VALUE = 2.0  # official fine-tuning wrapper: element-wise clip of every gradient to +-2


@dataclass
class EpochScores:
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float


@torch.no_grad()
def evaluate_cached(
    head: AnnotationHead,
    cache: TokenStates,
    rows: np.ndarray,
    y: torch.Tensor | None,
    weight: torch.Tensor | None,
    device,
    batch_size: int = 128,
) -> tuple[torch.Tensor, float, float]:
    """Logits (len(rows), C) in the order of `rows`, and with labels `y` (of those rows) the
    loss (the weighted mean over all rows, as one big batch would give) and the accuracy."""
    head.eval()
    out, total, wsum = [], 0.0, 0.0
    for a in range(0, len(rows), batch_size):
        states, mask = cache.batch(rows[a : a + batch_size], device)
        yb = None if y is None else y[a : a + batch_size].to(device)
        logits, loss = head.logits_and_loss(states, mask, yb, weight)
        out.append(logits.float().cpu())
        if yb is not None:
            bw = float(weight[yb].sum()) if weight is not None else float(len(yb))
            total, wsum = total + loss.item() * bw, wsum + bw
    logits = torch.cat(out) if out else torch.zeros(0, head.n_classes)
    if y is None:
        return logits, float("nan"), float("nan")
    return logits, total / max(wsum, 1e-12), float((logits.argmax(1) == y).float().mean())


def frozen_epoch_fn(
    head: AnnotationHead,
    cache: TokenStates,
    y: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    weight: torch.Tensor | None,
    lr: float,
    batch_size: int,
    device,
    seed: int,
) -> Callable[[], EpochScores]:
    """One epoch of the head alone on the cached states of the reference cells."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-5)
    rng = np.random.default_rng(seed)
    Y = torch.from_numpy(y).long()
    w = None if weight is None else weight.to(device)

    def epoch() -> EpochScores:
        head.train()
        total = correct = 0.0
        for rows in cache.length_batches(train_idx, batch_size, rng):
            states, mask = cache.batch(rows, device)
            yb = Y[rows].to(device)
            opt.zero_grad()
            logits, loss = head.logits_and_loss(states, mask, yb, w)
            loss.backward()
            opt.step()
            total += loss.item() * len(rows)
            correct += float((logits.argmax(1) == yb).sum())
        _, val_loss, val_acc = evaluate_cached(head, cache, val_idx, Y[val_idx], w, device)
        return EpochScores(total / len(train_idx), correct / len(train_idx), val_loss, val_acc)

    return epoch


def encoder_epoch_fn(
    encoder_module: nn.Module,
    head: AnnotationHead,
    train_batches: list,
    val_batches: list,
    y_train: torch.Tensor,
    y_val: torch.Tensor,
    weight: torch.Tensor | None,
    lr: float,
    head_lr: float,
    device,
    seed: int,
    st_tokens: bool = False,
) -> tuple[Callable[[], EpochScores], Callable[[], EpochScores]]:
    """(epoch, validate) for joint training of the encoder's trainable parameters and the head
    (official recipe: Adam, weight decay 1e-5, gradients clipped to +-2 element-wise); with
    `st_tokens` the ST tokens are in the sequence (and trained when trainable)."""
    enc_params = [p for p in encoder_module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(
        [
            {"params": enc_params, "lr": lr, "weight_decay": 1e-5},
            {"params": head.parameters(), "lr": head_lr, "weight_decay": 1e-5},
        ]
    )
    params = enc_params + list(head.parameters())
    rng = np.random.default_rng(seed)
    w = None if weight is None else weight.to(device)

    def run(b, y):
        b = b.to(device)
        states = encoder_states(encoder_module, b, st_tokens)  # (B, 1+L, D)
        yb = y[b.cell_index.cpu()].to(device)
        logits, loss = head.logits_and_loss(states, b.token_mask, yb, w)
        return logits, loss, yb

    def validate(train_scores: tuple[float, float] = (float("nan"), float("nan"))) -> EpochScores:
        encoder_module.eval(), head.eval()
        total = wsum = correct = n = 0.0
        with torch.no_grad():
            for b in val_batches:
                logits, loss, yb = run(b, y_val)
                bw = float(w[yb].sum()) if w is not None else float(len(yb))
                total, wsum = total + loss.item() * bw, wsum + bw
                correct, n = correct + float((logits.argmax(1) == yb).sum()), n + len(yb)
        return EpochScores(*train_scores, total / max(wsum, 1e-12), correct / max(n, 1))

    def epoch() -> EpochScores:
        encoder_module.train(), head.train()
        total = correct = n = 0.0
        for i in rng.permutation(len(train_batches)):
            opt.zero_grad()
            logits, loss, yb = run(train_batches[i], y_train)
            loss.backward()
            torch.nn.utils.clip_grad_value_(params, GRAD_CLIP_VALUE)
            opt.step()
            total, correct, n = (
                total + loss.item() * len(yb),
                correct + float((logits.argmax(1) == yb).sum()),
                n + len(yb),
            )
        return validate((total / max(n, 1), correct / max(n, 1)))

    return epoch, validate


def train_with_early_stopping(
    epoch_fn: Callable[[], EpochScores],
    modules: list[nn.Module],
    *,
    max_epochs: int,
    patience: int,
    phase: str,
    history: list[dict],
    smoothing: float = 1.0,
    progress: bool = True,
    initial: Callable[[], EpochScores] | None = None,
) -> dict:
    """Run epochs until the smoothed validation loss (exponential moving average, weight
    `smoothing` on the newest epoch) has not improved for `patience` epochs; restore the state of
    the best smoothed epoch (with `initial`, possibly the state before the first epoch). Returns a
    summary {phase, stopped_early, epochs_run, best_epoch, best_val_loss, reason}, also logged."""
    best, best_epoch, best_state, waited, ema = float("inf"), 0, None, 0, None

    def record(epoch: int, s: EpochScores) -> float:
        nonlocal ema
        ema = s.val_loss if ema is None else smoothing * s.val_loss + (1 - smoothing) * ema
        history.append({"phase": phase, "epoch": epoch, **s.__dict__, "val_loss_smoothed": ema})
        return ema

    if initial is not None:
        s = initial()
        best, best_state = record(0, s), [copy.deepcopy(m.state_dict()) for m in modules]
        log.info("annotate %s: before training val_loss %.4f val_acc %.3f", phase, s.val_loss, s.val_acc)
    bar = progress_bar(max_epochs, f"annotate {phase}", unit="epoch", enabled=progress)
    epochs_run = 0
    for ep in range(1, max_epochs + 1):
        s = epoch_fn()
        epochs_run = ep
        smooth = record(ep, s)
        log.info(
            "annotate %s epoch %d/%d: train_loss %.4f train_acc %.3f val_loss %.4f (smoothed %.4f) "
            "val_acc %.3f",
            phase, ep, max_epochs, s.train_loss, s.train_acc, s.val_loss, smooth, s.val_acc,
        )
        bar.update(1)
        bar.set_postfix(train_loss=f"{s.train_loss:.3f}", val_loss=f"{smooth:.3f}",
                        val_acc=f"{s.val_acc:.3f}")
        if smooth < best - 1e-4:
            best, best_epoch, waited = smooth, ep, 0
            best_state = [copy.deepcopy(m.state_dict()) for m in modules]
        else:
            waited += 1
            if waited >= patience:
                break
    bar.close()
    if best_state is not None:
        for m, state in zip(modules, best_state, strict=True):
            m.load_state_dict(state)
    stopped = waited >= patience
    kept = f"kept epoch {best_epoch} (best smoothed val loss {best:.4f})"
    if stopped:
        reason = (f"stopped early at epoch {epochs_run} of {max_epochs}: the smoothed validation loss did "
                  f"not improve for {patience} epochs; {kept}")
    else:
        reason = f"ran all {max_epochs} epochs; {kept}"
    log.info("annotate %s: %s", phase, reason)
    if progress:
        bar.write(f"annotate {phase}: {reason}")
    return {
        "phase": phase,
        "stopped_early": stopped,
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        "best_val_loss": best,
        "reason": reason,
    }
