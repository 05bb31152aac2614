"""Short self-supervised fine-tuning of the encoder on the data to integrate (no labels, no batches).

After the official BatchIntegration tutorial: continue the pretraining objective (masked value
reconstruction by the gene-wise and cell-wise decoders, here with half of each cell's genes in the
loss) on the cells to integrate, plus the elastic cell similarity (ECS) term (from scGPT), which
pushes cosine similarities between cells of a mini-batch away from a threshold (0.8): pairs above it
closer together, pairs below it apart, sharpening the cell-type structure. The tutorial trains all
parameters with Adam (1e-4, weight decay 1e-5) for 30 epochs on a GPU; on a CPU one or two epochs is
what fits. As in the official `FinetuneModel`, ECS compares the cells' cell-wise decoder predictions.

With `st_tokens=True` the model is the tutorial's ST-token model (model/st_tokens.py): two tokens
after CLS carry each cell's library size, and, as the tutorial's data pipeline does, half of the
cells are down-sampled (binomial thinning with p ~ Beta(2, 2), at least 1 count per gene): the
encoder sees the thinned values and their total S, the loss targets stay the original values.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from cellfm.cellfm import CellFM
from cellfm.contract.setup import setup_cells
from cellfm.embedding.engine import resolve_device
from cellfm.model.loss import pretraining_loss
from cellfm.model.st_tokens import st_features
from cellfm.progress import progress_bar
from cellfm.tokenizer import mask_values

if TYPE_CHECKING:
    import anndata as ad


def downsample(values: torch.Tensor, token_mask: torch.Tensor, totals: torch.Tensor,
               rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The official `Prepare.bayes` on a batch: (input values, S per cell). Each cell, with
    probability 1/2, gets its counts thinned (binomial, p ~ Beta(2, 2), floor 1) and its values
    renormalised by the thinned total S over its tokens; the other cells keep values and S = T."""
    counts = torch.round(torch.expm1(values.double()) * totals.double()[:, None] / 1e4)  # (B, L)
    out, sampled = values.clone(), totals.clone()
    for r in range(len(values)):
        if rng.binomial(1, 0.5) == 0:
            continue
        m = token_mask[r]
        thinned = np.maximum(rng.binomial(counts[r, m].numpy().astype(np.int64), rng.beta(2, 2)), 1)
        sampled[r] = float(thinned.sum())
        out[r, m] = torch.from_numpy(np.log1p(thinned / sampled[r].item() * 1e4).astype(np.float32))
    return out, sampled


def integration_loss(output, batch, targets: torch.Tensor, ecs_threshold: float = 0.8,
                     ecs_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Pretraining terms against `targets` (B, L) plus ECS on the cell-wise predictions of the real
    tokens (official FinetuneModel.construct). Returns the terms and their sum under 'loss'."""

    terms = pretraining_loss(output, dataclasses.replace(batch, values=targets))
    cell_pred = output.cell_pred * batch.token_mask.to(output.cell_pred.dtype)  # (B, L)
    terms["ecs"] = ecs_loss(cell_pred, ecs_threshold)
    terms["loss"] = terms["loss"] + ecs_weight * terms["ecs"]
    return terms


def ecs_loss(cell_emb: torch.Tensor, threshold: float = 0.8) -> torch.Tensor:
    """mean(1 - (relu(cos) - threshold)^2) over the (B, B) similarity matrix, diagonal zeroed (as
    the official code averages it); lowest when similarities sit far from `threshold`."""
    z = torch.nn.functional.normalize(cell_emb.float(), dim=-1)  # (B, D)
    cos = torch.relu(z @ z.T) * (1 - torch.eye(len(z), device=z.device))  # (B, B)
    return (1 - (cos - threshold) ** 2).mean()


def fine_tune_for_integration(
    adata: ad.AnnData,
    model: CellFM,
    *,
    epochs: int = 1,
    batch_size: int = 16,
    lr: float = 1e-4,
    mask_ratio: float = 0.5,
    ecs_threshold: float = 0.8,
    ecs_weight: float = 1.0,
    st_tokens: bool = False,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    setup: dict | None = None,
) -> CellFM:
    """A fine-tuned copy of `model` (the original is untouched); embed with it afterwards.

    `st_tokens=True`: fine-tune the authors' ST-token model (the model's ST weights when its
    checkpoint carries them, else new ones), with half of the cells down-sampled; embedding
    afterwards uses CLS alone, as the tutorial's `Backbone` does. The cells pass the input
    contract (`cellfm.contract.setup_cells`; `setup`: its `layer`, `use_raw`, `gene_key`,
    `allow_non_integer`)."""
    dev = resolve_device(device)
    if st_tokens:
        model = model.with_st_tokens()
    tuned = CellFM(model.config, copy.deepcopy(model.module), model.vocab)
    module = tuned.module.to(dev)
    for p in module.parameters():
        p.requires_grad_(True)
    batches = list(setup_cells(adata, model, seed=seed, **(setup or {})).batches(batch_size))
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=1e-5)
    rng = np.random.default_rng(seed)
    module.train()
    bar = progress_bar(epochs * len(batches), "integration fine-tune", unit="batch", enabled=progress)
    for _ in range(epochs):
        for i in rng.permutation(len(batches)):
            b = batches[i]
            hidden = torch.zeros_like(b.token_mask)
            loss_mask = torch.zeros_like(b.token_mask)
            for r, n in enumerate(b.token_mask.sum(1).tolist()):
                h, lm = mask_values(n, rng, mask_ratio=mask_ratio)
                hidden[r, :n], loss_mask[r, :n] = torch.from_numpy(h), torch.from_numpy(lm)
            b.hidden_mask, b.loss_mask = hidden, loss_mask
            targets, st_feat, inputs = b.values, None, b.values
            if st_tokens:
                inputs, sampled = downsample(b.values, b.token_mask, b.totals, rng)
                st_feat = st_features(b.totals, sampled).to(dev)
            b, targets, inputs = b.to(dev), targets.to(dev), inputs.to(dev)
            out = module(b.gene_ids, inputs, b.token_mask, b.hidden_mask, st_feat)
            loss = integration_loss(out, b, targets, ecs_threshold, ecs_weight)["loss"]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    module.eval().cpu()
    return tuned
