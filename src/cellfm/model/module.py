"""`CellFMModule`: the whole network on tensors (no AnnData, no files).

    gene ids, values (B, L) -> gene table + value encoder -> [CLS] + tokens (B, L+1, D)
    -> n_layers RetentionLayer (first half: hidden values and padding removed from the keys;
       second half: only padding removed) -> CLS = cell embedding, tokens -> decoders.

With `config.st_tokens` and library-size features `st_feat` (B, 2), two ST tokens follow CLS,
[CLS, ST, ST] + tokens (B, L+3, D), as in the authors' FinetuneModel (st_tokens.py).
`cell_embedding` is the inference-only path for the CLS output alone (CLS-only last layer);
`cell_embedding_packed` computes the same from a `PackedBatch` (tokenizer/packing.py): the cells
one after another in one token stream, each cell's CLS (and ST) tokens leading its segment, so no
FLOP goes to padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cellfm.config import ModelConfig
from cellfm.model.decoders import CellwiseDecoder, ValueDecoder
from cellfm.model.retention import RetentionLayer, Segments
from cellfm.model.st_tokens import STTokens
from cellfm.model.value_encoder import ValueEncoder
from cellfm.tokenizer.packing import PackedBatch


@dataclass
class ModelOutput:
    cell_emb: torch.Tensor  # (B, D) CLS output of the last layer
    token_emb: torch.Tensor  # (B, L, D) last-layer gene tokens
    gene_emb: torch.Tensor  # (B, L, D) gene-table rows of the tokens
    gene_pred: torch.Tensor  # (B, L) gene-wise value prediction
    cell_pred: torch.Tensor  # (B, L) cell-wise value prediction
    gene_zero_prob: torch.Tensor | None = None  # (B, L) only with add_zero
    cell_zero_prob: torch.Tensor | None = None


class CellFMModule(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.gene_emb = nn.Parameter(torch.empty(c.gene_table_rows, c.d_model))
        self.cls_token = nn.Parameter(torch.empty(1, 1, c.d_model))
        self.zero_emb = nn.Parameter(torch.zeros(1, 1, c.d_model))
        self.value_enc = ValueEncoder(c.d_model, c.value_bins)
        self.encoder = nn.ModuleList(
            RetentionLayer(
                c.d_model, c.n_heads, c.residual_alpha, c.dropout * i / c.n_layers,
                c.lora_rank, c.layer_norm_eps,
            )
            for i in range(c.n_layers)
        )
        self.value_dec = ValueDecoder(c.d_model, zero_head=c.add_zero)
        self.cellwise_dec = CellwiseDecoder(c.d_model, zero_head=c.add_zero)
        self.st = STTokens(c.d_model, c.value_bins) if c.st_tokens else None
        self.activation_checkpointing = False
        if self.gene_emb.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init: Xavier-normal(0.5) tables, Xavier gain (8 n_layers)^-1/4 on v, u, o."""
        nn.init.xavier_normal_(self.gene_emb, gain=0.5)
        self.gene_emb[0].zero_()
        # MindSpore's XavierNormal(0.5) on the (1, 1, D) token: fan_in = fan_out = D
        nn.init.normal_(self.cls_token, std=0.5 * self.config.d_model**-0.5)
        if self.st is not None:
            self.st.reset_parameters()
        beta = (8 * self.config.n_layers) ** -0.25
        for layer in self.encoder:
            a, f = layer.attn, layer.ffn
            for lin, gain in [(a.q_proj, 1.0), (a.k_proj, 1.0), (a.v_proj, beta), (a.u_proj, beta),
                              (a.o_proj, beta), (f.u_proj, beta), (f.v_proj, beta), (f.o_proj, beta)]:
                nn.init.xavier_normal_(lin.weight, gain=gain)

    def encode(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        token_mask: torch.Tensor,
        hidden_mask: torch.Tensor | None = None,
        st_feat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the last layer's states (B, P+L, D), P = 1 (CLS) or 3 (CLS, ST, ST) leading
        tokens, and gene_emb (B, L, D)."""
        x, gene_emb, key_masks, len_scale = self._tokens(gene_ids, values, token_mask, hidden_mask, st_feat)
        for layer, key_mask in zip(self.encoder, key_masks, strict=True):
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, key_mask, len_scale, use_reentrant=False
                )
            else:
                x = layer(x, key_mask, len_scale)
        return x, gene_emb

    @torch.inference_mode()
    def cell_embedding(
        self, gene_ids: torch.Tensor, values: torch.Tensor, token_mask: torch.Tensor,
        st_feat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Inference-only cell embeddings (B, D): `encode(...)[0][:, 0]` with less work. The last
        layer computes keys and values for every token but everything else for the CLS row only
        (~1.6x fewer FLOPs for the 2-layer 80M model)."""
        x, _, key_masks, len_scale = self._tokens(gene_ids, values, token_mask, st_feat=st_feat)
        *layers, last = self.encoder
        for layer, key_mask in zip(layers, key_masks, strict=False):
            x = layer(x, key_mask, len_scale)  # (B, T, D)
        return last.forward_first_row(x, key_masks[-1], len_scale)[:, 0]  # (B, D)

    @torch.inference_mode()
    def cell_embedding_packed(
        self, packed: PackedBatch, st_feat: torch.Tensor | None = None, grid: bool | None = None
    ) -> torch.Tensor:
        """`cell_embedding` of packed cells (B, D), without padding: N genes + B CLS (+ 2B ST) tokens
        in one stream; every token is a key (no hidden values at inference). `grid`: Kᵀ·V through
        a (cells, longest) grid in one batched matmul instead of a matmul per cell (`Segments`);
        None = on CUDA only."""
        c = self.config
        lengths = packed.cu_seqlens.diff()  # (B,) genes per cell
        B, N = lengths.shape[0], packed.gene_ids.shape[0]
        x = self.value_enc(packed.values)  # (N, D)
        if not c.pad_zero:  # zero-valued tokens take the learned zero embedding, as in `_tokens`
            zero = (packed.values == 0).unsqueeze(-1).to(x.dtype)  # (N, 1)
            x = zero * self.zero_emb[0] + (1 - zero) * x
        x = self.gene_emb[packed.gene_ids] + x  # (N, D)
        lead = self.cls_token.expand(B, 1, -1).to(x.dtype)  # (B, 1, D)
        if st_feat is not None:
            if self.st is None:
                raise ValueError("st_feat given but this model has no ST tokens (config.st_tokens=False)")
            lead = torch.cat([lead, self.st(st_feat).to(x.dtype)], dim=1)  # (B, 3, D)
        P = lead.shape[1]
        # stream: cell b = [its P lead tokens, its genes]; gene t of cell b moves P (b + 1) rows down
        cell = torch.repeat_interleave(torch.arange(B, device=x.device), lengths, output_size=N)  # (N,)
        starts = packed.cu_seqlens[:-1] + P * torch.arange(B, device=x.device)  # (B,) CLS rows
        T = N + P * B
        stream = x.new_empty(T, x.shape[1])  # (T = N + PB, D)
        stream[torch.arange(N, device=x.device) + P * (cell + 1)] = x
        stream[(starts.unsqueeze(1) + torch.arange(P, device=x.device)).flatten()] = lead.reshape(B * P, -1)
        # V length scale 1/sqrt(genes of the cell), as `_tokens`
        len_scale = torch.rsqrt(lengths.to(x.dtype).clamp_min(1.0))  # (B,)
        seg_len = lengths + P  # (B,) tokens of each cell in the stream
        v_scale = torch.repeat_interleave(len_scale, seg_len, output_size=T).unsqueeze(-1)  # (T, 1)
        seg = Segments(seg_len.tolist(), v_scale, starts)
        if (x.device.type == "cuda") if grid is None else grid:
            seg.width = max(seg.lengths)
            seg.slots = torch.arange(T, device=x.device) + torch.repeat_interleave(
                torch.arange(B, device=x.device) * seg.width - starts, seg_len, output_size=T)  # (T,)
        *layers, last = self.encoder
        for layer in layers:
            stream = layer.forward_packed(stream, seg)  # (T, D)
        return last.forward_packed(stream, seg, cls_only=True)  # (B, D)

    def _tokens(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        token_mask: torch.Tensor,
        hidden_mask: torch.Tensor | None = None,
        st_feat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Encoder input (B, T=P+L, D) with CLS (and ST) first, gene_emb (B, L, D), each layer's key
        mask (B, T) and the V length scale (B,)."""
        B, L = gene_ids.shape
        c = self.config
        gene_emb = self.gene_emb[gene_ids]  # (B, L, D)
        x = self.value_enc(values, hidden_mask)  # (B, L, D)
        tokens = token_mask.to(x.dtype)  # (B, L)
        visible = tokens if hidden_mask is None else tokens * (~hidden_mask).to(x.dtype)
        if not c.pad_zero:
            # official pad_zero=False: unmasked zero-valued tokens take the learned zero embedding
            zero = ((values == 0) & token_mask).unsqueeze(-1).to(x.dtype) * visible.unsqueeze(-1)
            x = zero * self.zero_emb + (1 - zero) * x
        x = gene_emb + x
        lead = [self.cls_token.expand(B, 1, -1).to(x.dtype)]
        if st_feat is not None:
            if self.st is None:
                raise ValueError("st_feat given but this model has no ST tokens (config.st_tokens=False)")
            lead.append(self.st(st_feat).to(x.dtype))  # (B, 2, D)
        x = torch.cat([*lead, x], dim=1)  # (B, T=P+L, D)
        ones = tokens.new_ones(B, x.shape[1] - L)
        keep = torch.cat([ones, tokens], dim=1)  # (B, T) real tokens incl. CLS (and ST)
        if c.pad_zero:
            x = x * keep.unsqueeze(-1)
        # V is scaled by 1/sqrt(number of expressed genes) (official: rsqrt(sum(zero_idx) - 1); the
        # ST model's rsqrt(sum - 3)). A per-cell factor on V cancels in the head RMS norm of the
        # retention output, so these variants give the same outputs and gradients.
        len_scale = torch.rsqrt(tokens.sum(1).clamp_min(1.0))  # (B,)
        first_keys = torch.cat([ones, visible], dim=1)
        key_masks = [first_keys if i < c.n_layers // 2 else keep for i in range(c.n_layers)]
        return x, gene_emb, key_masks, len_scale

    def forward(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        token_mask: torch.Tensor,
        hidden_mask: torch.Tensor | None = None,
        st_feat: torch.Tensor | None = None,
    ) -> ModelOutput:
        states, gene_emb = self.encode(gene_ids, values, token_mask, hidden_mask, st_feat)
        cell_emb, token_emb = states[:, 0], states[:, states.shape[1] - gene_ids.shape[1]:]
        gene_pred, gene_zero = self.value_dec(token_emb)
        cell_pred, cell_zero = self.cellwise_dec(cell_emb, gene_emb)
        if self.config.cellwise_offset:
            cell_pred = cell_pred + visible_mean(values, token_mask, hidden_mask)
        return ModelOutput(cell_emb, token_emb, gene_emb, gene_pred, cell_pred, gene_zero, cell_zero)

    def merge_lora(self) -> None:
        for m in self.modules():
            if hasattr(m, "merge_lora") and m is not self:
                m.merge_lora()

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def visible_mean(values: torch.Tensor, token_mask: torch.Tensor, hidden_mask: torch.Tensor | None
                 ) -> torch.Tensor:
    """(B, 1) mean value of the tokens the encoder sees: the cell's library-size level, known from
    the input, so the cell-wise decoder can add it instead of reading it from the CLS."""
    seen = token_mask if hidden_mask is None else token_mask & ~hidden_mask
    seen = seen.to(values.dtype)
    return (values * seen).sum(1, keepdim=True) / seen.sum(1, keepdim=True).clamp_min(1.0)


def approx_flops_per_token(config: ModelConfig) -> float:
    """Forward FLOPs per token: 8 d^2 projections + 2 * 2 d * hd retention per layer, ~2 MACs."""
    d, hd = config.d_model, config.head_dim
    per_layer = 2 * 8 * d * d + 2 * 2 * d * hd
    heads = 2 * (2 * d * d) + 2 * d * config.value_bins
    return config.n_layers * per_layer + heads + 2 * config.value_bins * (config.value_bins + d)


__all__ = ["CellFMModule", "ModelOutput", "approx_flops_per_token"]
