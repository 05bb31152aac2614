"""GEARS fed with CellFM gene tokens, the authors' way (CellFM `tutorials/Perturbation`).

GEARS pairs every perturbed cell with a random control cell and predicts the perturbed profile
from it. Plain GEARS gives each gene a learned embedding (plus a co-expression GNN); the CellFM
authors replace that with the CellFM encoder's output token of each gene *in the paired control
cell*: all genes of the panel enter the encoder with their control values (zeros included), the
per-cell gene tokens (n_control, n_genes, D) are computed once, and an MLP (D -> 2h -> h, theirs
1536 -> 1024 -> 512) turns a cell's tokens into the base gene embeddings. Everything after that
(GO-graph perturbation embedding, fusion, gene-specific decoders) is GEARS unchanged.

`cell-gears` and `torch_geometric` are optional (`pip install "cellfm[gears]"`), imported here only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

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
    from cellfm.tasks.perturbation import _map_to_vocab

    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] != len(genes):
        raise ValueError(f"values has shape {values.shape} but {len(genes)} genes were given: pass one "
                         "column per gene (cells x genes)")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError("values hold NaN, infinite or negative numbers: pass log1p(count / total * 1e4)")
    ids = torch.as_tensor(_map_to_vocab(genes, model), dtype=torch.long)  # (G,)
    module = model.module.eval()
    dev = next(module.parameters()).device
    n, G = values.shape
    dtype = torch.float32 if n * G * model.config.d_model * 4 <= 2**30 else torch.float16
    out = torch.empty(n, G, model.config.d_model, dtype=dtype)
    steps = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="CellFM gene tokens of control cells", unit="batch")
    for s in steps:
        v = torch.as_tensor(values[s : s + batch_size], dtype=torch.float32, device=dev)  # (B, G)
        gene_ids = ids.to(dev).expand(len(v), G)
        mask = torch.ones_like(v, dtype=torch.bool)
        states, _ = module.encode(gene_ids, v, mask)  # (B, 1+G, D)
        out[s : s + len(v)] = states[:, states.shape[1] - G :].to(dtype).cpu()
    return out


def gears_model_class():
    """The model class, built on first use so that `cell-gears` stays optional."""
    from gears.model import MLP, GEARS_Model

    class GearsOnCellTokens(GEARS_Model):
        """GEARS_Model whose base gene embeddings come from CellFM tokens of the paired control
        cell (`data.z` = its row in `tokens`). `tokens` None: plain GEARS base embeddings (used to
        check that the rest of this forward is GEARS')."""

        def __init__(self, args: dict, tokens: torch.Tensor | None = None) -> None:
            super().__init__(args)
            h = args["hidden_size"]
            self.tokens = tokens  # (n_control, G, D), not a parameter: frozen and possibly large
            if tokens is not None:
                self.token_mlp = MLP([tokens.shape[-1], 2 * h, h], last_layer_act="ReLU")

        def base_embedding(self, data, n: int) -> torch.Tensor:
            """(n * G, h) embedding of every gene of every cell in the batch."""
            dev = self.indv_w1.device
            if self.tokens is None:  # GEARS: gene table + 0.2 * co-expression GNN, then an MLP
                idx = torch.arange(self.num_genes, device=dev).repeat(n)
                base = self.emb_trans(self.bn_emb(self.gene_emb(idx)))
                pos = self.emb_pos(idx)
                for i, layer in enumerate(self.layers_emb_pos):
                    pos = layer(pos, self.G_coexpress, self.G_coexpress_weight)
                    pos = pos.relu() if i < len(self.layers_emb_pos) - 1 else pos
                return self.emb_trans_v2(base + 0.2 * pos)
            z = data.z.reshape(-1).cpu()  # (n,) control cell of each graph
            tok = self.tokens[z].to(dev, torch.float32)  # (n, G, D)
            return self.token_mlp(tok.reshape(n * self.num_genes, -1))

        def forward(self, data) -> torch.Tensor:
            n, G = data.num_graphs, self.num_genes
            base = self.base_embedding(data, n).reshape(n, G, -1)  # (n, G, h)
            # perturbation embeddings, smoothed over the GO graph
            pert = self.pert_emb(torch.arange(self.num_perts, device=base.device))  # (P, h)
            for i, layer in enumerate(self.sim_layers):
                pert = layer(pert, self.G_sim, self.G_sim_weight)
                pert = pert.relu() if i < self.num_layers - 1 else pert
            # each perturbed cell: sum of its perturbations' embeddings, fused, added to all genes
            cells = [c for c, idx in enumerate(data.pert_idx) for p in idx if p != -1]
            perts = [p for idx in data.pert_idx for p in idx if p != -1]
            if cells:
                order = list(dict.fromkeys(cells))  # first-seen order, as GEARS
                row = {c: r for r, c in enumerate(order)}
                summed = torch.zeros(len(order), pert.shape[1], device=base.device, dtype=pert.dtype)
                summed = summed.index_add(0, torch.tensor([row[c] for c in cells], device=base.device),
                                          pert[perts])
                fused = self.pert_fuse(summed if len(order) > 1 else summed.repeat(2, 1))  # BN needs 2
                base = base.clone()
                base[order] = base[order] + fused[: len(order), None, :]
            base = self.transform(self.bn_pert_base(base.reshape(n * G, -1)))
            out = self.recovery_w(base).reshape(n, G, -1)  # (n, G, h)
            out = (out.unsqueeze(-1) * self.indv_w1).sum(2) + self.indv_b1  # (n, G, 1)
            cross = self.cross_gene_state(out.reshape(n, G))  # (n, h)
            cross = cross.repeat(1, G).reshape(n, G, -1)  # (n, G, h)
            out = (torch.cat([out, cross], 2) * self.indv_w2).sum(2) + self.indv_b2  # (n, G)
            return out + data.x.reshape(n, G)

    return GearsOnCellTokens


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
