"""Short self-supervised fine-tuning of the encoder on the data to integrate (no labels, no batches).

After the official BatchIntegration tutorial: continue the pretraining objective (masked value
reconstruction by the gene-wise and cell-wise decoders, here with half of each cell's genes in the
loss) on the cells to integrate, plus the elastic cell similarity (ECS) term (from scGPT), which
pushes cosine similarities between cells of a mini-batch away from a threshold (0.8): pairs above it
closer together, pairs below it apart, sharpening the cell-type structure. The tutorial trains all
parameters with Adam (1e-4, weight decay 1e-5) for 30 epochs on a GPU; on a CPU one or two epochs is
what fits.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM


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
    device: str | torch.device | None = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> CellFM:
    """A fine-tuned copy of `model` (the original is untouched); embed with it afterwards."""
    import pandas as pd
    from tqdm.auto import tqdm

    from cellfm.cellfm import CellFM
    from cellfm.embedding import resolve_device
    from cellfm.model.loss import pretraining_loss
    from cellfm.tokenizer import iter_token_batches, mask_values
    from cellfm.vocab import map_genes

    dev = resolve_device(device)
    tuned = CellFM(model.config, copy.deepcopy(model.module), model.vocab)
    module = tuned.module.to(dev)
    for p in module.parameters():
        p.requires_grad_(True)
    mapping = map_genes(pd.Index(adata.var_names.astype(str)), model.vocab)
    batches = list(
        iter_token_batches(adata, mapping, batch_size=batch_size, max_genes=model.config.max_genes, seed=seed)
    )
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=1e-5)
    rng = np.random.default_rng(seed)
    module.train()
    bar = tqdm(total=epochs * len(batches), desc="integration fine-tune", disable=not progress)
    for _ in range(epochs):
        for i in rng.permutation(len(batches)):
            b = batches[i]
            hidden = torch.zeros_like(b.token_mask)
            loss_mask = torch.zeros_like(b.token_mask)
            for r, n in enumerate(b.token_mask.sum(1).tolist()):
                h, lm = mask_values(n, rng, mask_ratio=mask_ratio)
                hidden[r, :n], loss_mask[r, :n] = torch.from_numpy(h), torch.from_numpy(lm)
            b.hidden_mask, b.loss_mask = hidden, loss_mask
            b = b.to(dev)
            out = module(b.gene_ids, b.values, b.token_mask, b.hidden_mask)
            loss = pretraining_loss(out, b)["loss"] + ecs_weight * ecs_loss(out.cell_emb, ecs_threshold)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
    bar.close()
    module.eval().cpu()
    return tuned
