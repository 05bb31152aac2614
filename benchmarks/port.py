"""The authors' PyTorch port (CellFM-torch, a local checkout passed by path) holding our weights,
so that both run the same random model on the same batches (benchmarks/embed.py)."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from measure import best_time


def port_with_our_weights(path: str, module, cfg):
    """CellFM-torch's FinetuneModel (imported from the checkout at PATH) holding our weights."""
    sys.path.insert(0, path)
    from layers.torch_finetune import FinetuneModel  # the authors' code, read from PATH

    class Cfg:  # the fields FinetuneModel reads
        enc_dims, enc_nlayers, enc_num_heads = cfg.d_model, cfg.n_layers, cfg.n_heads
        enc_dropout, dropout, lora, recompute = 0.0, 0.0, 0, False
        add_zero, pad_zero, ecs, ecs_threshold = False, True, False, 0.8

    theirs = FinetuneModel(cfg.n_genes, Cfg()).eval()
    renamed = {}
    for k, v in module.state_dict().items():
        if k.startswith("value_enc.") and k != "value_enc.mask_emb":
            k = "value_enc.value_enc." + k.removeprefix("value_enc.")
        renamed[k] = v
    their_state = theirs.state_dict()
    loaded = {k: v for k, v in renamed.items() if k in their_state and their_state[k].shape == v.shape}
    theirs.load_state_dict(loaded, strict=False)
    needed = [k for k in their_state if k.startswith(("encoder.", "value_enc.", "gene_emb", "cls_token"))]
    missing = [k for k in needed if k not in loaded]
    if missing:
        raise RuntimeError(f"could not map our weights onto CellFM-torch: {missing[:5]}")
    return theirs


def run_official(path: str, module, cfg, batches, n_cells: int, repeats: int) -> dict:
    """Time CellFM-torch's FinetuneModel.embedding_infer on the same batches and weights."""
    if cfg.value_bins != 256:
        return {"official_note": f"needs value_bins=256 (preset has {cfg.value_bins})"}
    theirs = port_with_our_weights(path, module, cfg)

    def official_all():
        with torch.inference_mode():
            for ids, vals, mask in batches:
                theirs.embedding_infer(vals, ids, None, mask.float())

    t = best_time(official_all, repeats=repeats)
    # the port's own data path (`Prepare.pad_zero`, `SCrna`) pads every cell to nonz_len = 2048
    full = [(F.pad(i, (0, cfg.max_genes - i.shape[1])), F.pad(v, (0, cfg.max_genes - v.shape[1])),
             F.pad(m, (0, cfg.max_genes - m.shape[1]))) for i, v, m in batches]

    def official_padded():
        with torch.inference_mode():
            for ids, vals, mask in full:
                theirs.embedding_infer(vals, ids, None, mask.float())

    t_padded = best_time(official_padded, repeats=repeats)
    ids, vals, mask = batches[len(batches) // 2]
    with torch.inference_mode():
        a = module.encode(ids, vals, mask)[0][:, 0]
        b = theirs.embedding_infer(vals, ids, None, mask.float())[0][:, 0]
    cos = F.cosine_similarity(a, b, dim=-1).min().item()
    return {"official_cells_s": n_cells / t, "official_padded_cells_s": n_cells / t_padded,
            "official_min_cos": cos}
