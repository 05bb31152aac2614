"""GEARS fed with CellFM gene tokens, the authors' way (CellFM `tutorials/Perturbation`).

GEARS pairs every perturbed cell with a random control cell and predicts the perturbed profile
from it. Plain GEARS gives each gene a learned embedding (plus a co-expression GNN); the CellFM
authors replace that with the CellFM encoder's output token of each gene *in the paired control
cell*: all genes of the panel enter the encoder with their control values (zeros included), the
per-cell gene tokens (n_control, n_genes, D) are computed once, and an MLP (D -> 2h -> h, theirs
1536 -> 1024 -> 512) turns a cell's tokens into the base gene embeddings. Everything after that
(GO-graph perturbation embedding, fusion, gene-specific decoders) is GEARS unchanged.

The model itself is `cellfm.model.gears_adapter.GearsOnCellTokens`; this module prepares its
inputs (the tokens, and which control cell each GEARS cell graph was paired with).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from cellfm.tasks.perturbation import map_to_vocab

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM


@torch.inference_mode()
def control_gene_tokens(
    model: CellFM, values: np.ndarray, genes: list[str], batch_size: int = 32, progress: bool = True
) -> torch.Tensor:
    """Last-layer gene tokens of every gene in every control cell, (n_cells, n_genes, D): float32
    up to 1 GiB, float16 beyond (the 800M model's 1536-wide tokens of thousands of cells).

    `values` (n_cells, n_genes) are log1p(count / total * 1e4), the encoder's value scale; genes
    missing from the vocabulary enter with the padding row's (zero) gene embedding, as the authors'
    id 0, so their token carries only the value.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] != len(genes):
        raise ValueError(f"values has shape {values.shape} but {len(genes)} genes were given: pass one "
                         "column per gene (cells x genes)")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError("values hold NaN, infinite or negative numbers: pass log1p(count / total * 1e4)")
    ids = torch.as_tensor(map_to_vocab(genes, model), dtype=torch.long)  # (G,)
    module = model.module.eval()
    dev = next(module.parameters()).device
    n, G = values.shape
    dtype = torch.float32 if n * G * model.config.d_model * 4 <= 2**30 else torch.float16
    out = torch.empty(n, G, model.config.d_model, dtype=dtype)
    steps = range(0, n, batch_size)
    if progress:
        steps = tqdm(steps, desc="CellFM gene tokens of control cells", unit="batch")
    for s in steps:
        v = torch.as_tensor(values[s : s + batch_size], dtype=torch.float32, device=dev)  # (B, G)
        gene_ids = ids.to(dev).expand(len(v), G)
        mask = torch.ones_like(v, dtype=torch.bool)
        states, _ = module.encode(gene_ids, v, mask)  # (B, 1+G, D)
        out[s : s + len(v)] = states[:, states.shape[1] - G :].to(dtype).cpu()
    return out


def attach_control_index(pert_data, control: ad.AnnData) -> None:
    """Give every GEARS cell graph `z`, the row in `control` of its paired control cell.

    GEARS (cell-gears 0.1.2) samples the pairing inside `PertData` without recording it; the
    graph's input `x` is an exact copy of the control row, so the row is found by its bytes.
    Identical control rows give identical tokens, so ties do not matter.
    """
    X = control.X.toarray() if hasattr(control.X, "toarray") else np.asarray(control.X)
    lookup = {np.asarray(r, dtype=np.float32).tobytes(): i for i, r in enumerate(X)}
    for graphs in pert_data.dataset_processed.values():
        for g in graphs:
            key = g.x.reshape(-1).numpy().astype(np.float32).tobytes()
            if key not in lookup:
                raise RuntimeError("a GEARS cell graph's input is not a control cell; cell-gears changed?")
            g.z = torch.tensor([lookup[key]])
