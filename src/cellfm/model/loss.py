"""Pretraining objective: masked MSE of both decoders at the loss positions, summed (official
MaskedMSE '_ge' + '_ce'); with add_zero also the zero-probability BCE terms (official BCE).

Step parity with the official MindSpore code (loss and every gradient, with and without add_zero):
tests/test_train_parity.py."""

from __future__ import annotations

import torch

from cellfm.batch import CellBatch
from cellfm.model.module import ModelOutput


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()
    return ((pred.float() - target.float()) ** 2 * mask).sum() / mask.sum().clamp_min(1.0)


def zero_bce(
    prob: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """BCE of the is-expressed probability as the official `BCE` computes it: the sum runs over
    every token, visible ones included, and is divided by the number of loss positions (the
    official pipeline has no padding; ours leaves padding out of the sum)."""
    prob = prob.float()
    target = target.float()
    log_p = torch.log(prob.clamp(1e-12, 1.0))
    log_q = torch.log((1 - prob).clamp(1e-12, 1.0))
    nll = -(target * log_p + (1 - target) * log_q)
    return (nll * token_mask.float()).sum() / loss_mask.float().sum().clamp_min(1.0)


def pretraining_loss(output: ModelOutput, batch: CellBatch, cellwise_weight: float = 1.0
                     ) -> dict[str, torch.Tensor]:
    """Returns {'loss', 'gene_mse', 'cell_mse'[, 'gene_bce', 'cell_bce']}.

    loss = gene terms + cellwise_weight * cell terms (official: weight 1).
    """
    mask = batch.loss_mask if batch.loss_mask is not None else batch.token_mask
    mask = mask & batch.token_mask
    terms = {
        "gene_mse": masked_mse(output.gene_pred, batch.values, mask),
        "cell_mse": masked_mse(output.cell_pred, batch.values, mask),
    }
    if output.gene_zero_prob is not None:
        expressed = (batch.values != 0).float()
        terms["gene_bce"] = zero_bce(output.gene_zero_prob, expressed, batch.token_mask, mask)
        terms["cell_bce"] = zero_bce(output.cell_zero_prob, expressed, batch.token_mask, mask)
    terms["loss"] = sum(v * (cellwise_weight if k.startswith("cell") else 1.0) for k, v in terms.items())
    return terms
