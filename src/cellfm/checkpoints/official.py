"""Official CellFM checkpoints (MindSpore `.ckpt`, CellFM-torch `.pt`) -> our `CellFM`.

Official names differ from ours in four places: the value encoder's inner `value_enc.` level,
MindSpore's LayerNorm `gamma`/`beta`, LoRA blocks `lora_q.A/B` beside the projection, and the ST
tokens of the authors' FinetuneModel (`ST_emb`, `ST_enc.*` -> `st.emb`, `st.enc.*`). The config
is read off the shapes; only the number of heads is not in them (48 in both releases). Every
model tensor that has no place in our model is named in a warning, never dropped silently.
"""

from __future__ import annotations

import logging
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from cellfm.checkpoints.mindspore_ckpt import read_mindspore_checkpoint
from cellfm.config import ModelConfig

OPTIMIZER_PREFIXES = ("moment1.", "moment2.", "adam_m.", "adam_v.", "accum.", "momentum.")
OPTIMIZER_KEYS = {"global_step", "learning_rate", "beta1_power", "beta2_power", "scale_sense",
                  "current_iterator_step", "last_overflow_iterator_step", "epoch_num", "step_num"}
# parts of the official model that ours leaves out: the optional label-classification heads of
# the MindSpore model (`label=True`)
DROPPED_PREFIXES = ("cluster_emb", "query.", "classifier.", "proj.")
# the ST tokens are loaded when the checkpoint carries all of them
ST_TENSORS = ("ST_emb", "ST_enc.w1.weight", "ST_enc.w3.weight", "ST_enc.a", "ST_enc.table.weight")
log = logging.getLogger(__name__)
VOCAB_BY_ROWS = {24080: ("cellfm-24k", 24078), 27856: ("cellfm-27k", 27855)}
_LORA = re.compile(r"^(encoder\.\d+\.(?:attn|ffn))\.lora_([qkvuo])\.([AB])\.weight$")


def official_to_ours(name: str) -> str:
    if name == "ST_emb":
        return "st.emb"
    if name.startswith("ST_enc."):
        return "st.enc." + name[len("ST_enc."):]
    name = name.replace("value_enc.value_enc.", "value_enc.")
    name = re.sub(r"(post_norm\d)\.gamma$", r"\1.weight", name)
    name = re.sub(r"(post_norm\d)\.beta$", r"\1.bias", name)
    m = _LORA.match(name)
    if m:
        return f"{m.group(1)}.{m.group(2)}_proj.lora_{m.group(3).lower()}"
    return name


def split_official_state(tensors: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our state dict, dropped model tensors) from official names; a warning names every dropped
    tensor (optimizer state is left out too, and only logged)."""
    has_st = all(n in tensors for n in ST_TENSORS)
    state, dropped, optimizer = {}, [], 0
    for name, value in tensors.items():
        if name in OPTIMIZER_KEYS or name.startswith(OPTIMIZER_PREFIXES):
            optimizer += 1
            continue
        if name.startswith(DROPPED_PREFIXES) or (name.startswith(("ST_emb", "ST_enc.")) and not has_st):
            dropped.append(name)
            continue
        state[official_to_ours(name)] = torch.from_numpy(np.array(value, dtype=np.float32))
    if optimizer:
        log.info("left out %d optimizer-state tensors (moment1.*, moment2.*, step counters)", optimizer)
    if dropped:
        why = []
        if any(n.startswith(DROPPED_PREFIXES) for n in dropped):
            why.append("label-classification heads (official label=True) are not part of CellFMModule")
        if any(n.startswith(("ST_emb", "ST_enc.")) for n in dropped):
            missing = [n for n in ST_TENSORS if n not in tensors]
            why.append(f"ST tokens incomplete (missing {missing})")
        warnings.warn(f"dropped {len(dropped)} checkpoint tensors ({'; '.join(why)}): "
                      f"{', '.join(sorted(dropped))}", stacklevel=3)
    return state, dropped


def infer_config(state: dict[str, torch.Tensor], n_heads: int | None = None) -> ModelConfig:
    if "gene_emb" not in state:
        raise ValueError(f"no 'gene_emb' tensor: not a CellFM checkpoint (keys: {sorted(state)[:8]})")
    rows, d_model = state["gene_emb"].shape
    if rows not in VOCAB_BY_ROWS:
        raise ValueError(f"gene table has {rows} rows; official vocabularies give {sorted(VOCAB_BY_ROWS)}")
    vocabulary, n_genes = VOCAB_BY_ROWS[rows]
    layers = {k.split(".")[1] for k in state if k.startswith("encoder.") and k.endswith("q_proj.weight")}
    n_layers = len(layers)
    if n_heads is None:
        if d_model != 1536:
            raise ValueError(f"d_model={d_model}: the number of heads is not stored in the checkpoint; "
                             "pass n_heads=... (the official 80M and 800M models use 48)")
        n_heads = 48
    lora = state.get("encoder.0.attn.q_proj.lora_a")
    add_zero = "value_dec.zero_logit.0.weight" in state
    return ModelConfig(
        n_genes=n_genes, vocabulary=vocabulary, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        value_bins=state["value_enc.w1.weight"].shape[0], lora_rank=0 if lora is None else lora.shape[0],
        add_zero=add_zero, pad_zero=not add_zero, st_tokens="st.emb" in state,
    )


def read_torch_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """A CellFM-torch state dict (weights_only load; nested and wrapper prefixes removed)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for name, value in obj.items():
        for prefix in ("module.", "extractor.net.", "extractor.", "net."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if isinstance(value, torch.Tensor):
            out[name] = value.float().numpy()
    return out


def read_official_tensors(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    if zipfile.is_zipfile(path):  # torch.save format
        return read_torch_checkpoint(path)
    return read_mindspore_checkpoint(path)


def load_official_checkpoint(path: str | Path, device=None, n_heads: int | None = None):
    """An official checkpoint file as a `cellfm.CellFM` (MindSpore or CellFM-torch layout)."""
    from cellfm.cellfm import CellFM, load_state_checked
    from cellfm.model import CellFMModule

    state, _ = split_official_state(read_official_tensors(path))
    config = infer_config(state, n_heads)
    module = CellFMModule(config)
    load_state_checked(module, state, source=str(path))
    return CellFM(config, module, device=device)


def convert_checkpoint(src: str | Path, out_dir: str | Path, n_heads: int | None = None,
                       overwrite: bool = False):
    """Official checkpoint -> our folder format. Returns the loaded `CellFM`."""
    model = load_official_checkpoint(src, n_heads=n_heads)
    model.save(out_dir, overwrite=overwrite)
    return model
