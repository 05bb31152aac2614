"""GEARS with CellFM gene tokens in place of its gene embedding (the CellFM authors' adapter).

GEARS builds each gene's base embedding from a learned table plus a co-expression GNN, the same
for every cell. The CellFM authors replace it with the CellFM encoder's token of that gene in the
cell's paired control cell, through an MLP (D -> 2h -> h). `GearsOnCellTokens` is GEARS' own
`GEARS_Model` with only those embedding modules swapped: its `forward` is GEARS', unchanged, so
perturbation embeddings, fusion and the gene-specific decoders stay exactly theirs.

`cell-gears` is an optional extra (`pip install "cellfm[gears]"`); without it the class exists but
refuses to be built, so that importing the workflow that uses it never fails.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from gears.model import MLP, GEARS_Model
except ImportError as err:  # optional extra; building the model says how to install it
    _MISSING: ImportError | None = err
    GEARS_Model = nn.Module
else:
    _MISSING = None


class CellTokenEmbedding(nn.Module):
    """Base gene embedding of every gene of every cell in a GEARS batch, from the CellFM tokens of
    each graph's paired control cell. `cells` (n_graphs,) is set before each forward."""

    def __init__(self, tokens: torch.Tensor, hidden: int) -> None:
        super().__init__()
        self.tokens = tokens  # (n_control, G, D): frozen and possibly large, so not a buffer
        self.mlp = MLP([tokens.shape[-1], 2 * hidden, hidden], last_layer_act="ReLU")
        self.cells: torch.Tensor | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # idx: (n * G,) gene indices, GEARS' call; the genes are all G of each of the n cells
        if self.cells is None:
            raise RuntimeError("no paired control cells: the batch graphs need `z` (attach_control_index)")
        n, G = len(self.cells), self.tokens.shape[1]
        if len(idx) != n * G:
            raise RuntimeError(f"GEARS asked for {len(idx)} gene embeddings, the batch has {n} x {G}")
        tok = self.tokens[self.cells.reshape(-1).cpu()].to(idx.device, torch.float32)  # (n, G, D)
        return self.mlp(tok.reshape(n * G, -1))  # (n * G, h)


class _Zeros(nn.Module):
    """Stands in for GEARS' co-expression embedding: the tokens already carry the cell's state."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(idx), self.hidden, device=idx.device)  # (n * G, h)


def _pair_cells(module: GearsOnCellTokens, args: tuple) -> None:
    """Forward pre-hook: hand the batch's paired control rows (`data.z`) to the gene embedding.
    A plain function, not a bound method, so that GEARS' deepcopy of its best model keeps working."""
    module.gene_emb.cells = args[0].z


class GearsOnCellTokens(GEARS_Model):
    """GEARS_Model whose base gene embedding is `CellTokenEmbedding`; everything else is GEARS'.

    args: GEARS' config dict (`GEARS.config` after `model_initialize`); tokens: (n_control, G, D)
    CellFM gene tokens of the control cells (`control_gene_tokens`), row = a graph's `z`.
    """

    def __init__(self, args: dict, tokens: torch.Tensor) -> None:
        if _MISSING is not None:
            raise ImportError(f"GEARS is not installed ({_MISSING.name} missing): "
                              'pip install "cellfm[gears]"')
        super().__init__(args)
        h = args["hidden_size"]
        if tokens.ndim != 3 or tokens.shape[1] != self.num_genes:
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}; GEARS' panel has {self.num_genes} "
                             "genes: pass (n_control_cells, n_genes, d_model)")
        self.gene_emb = CellTokenEmbedding(tokens, h)
        self.bn_emb = nn.Identity()
        self.emb_trans = nn.Identity()
        self.emb_pos = _Zeros(h)
        self.layers_emb_pos = nn.ModuleList()  # no co-expression GNN
        self.emb_trans_v2 = nn.Identity()
        self.register_forward_pre_hook(_pair_cells)
