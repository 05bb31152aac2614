"""Official CellFM checkpoints (MindSpore `.ckpt`, CellFM-torch `.pt`) -> our config + state dict.

Official names differ from ours in four places: the value encoder's inner `value_enc.` level,
MindSpore's LayerNorm `gamma`/`beta`, LoRA blocks `lora_q.A/B` beside the projection, and the ST
tokens of the authors' FinetuneModel (`ST_emb`, `ST_enc.*` -> `st.emb`, `st.enc.*`). Every model
tensor that has no place in our model is named in a warning, never dropped silently.

Shapes give the vocabulary, width, depth, value bins, LoRA rank, ST tokens and the zero heads
(`add_zero`). What they do not give is taken from the official config of the release: the number
of heads and `pad_zero` (the 80M release was trained with `Config_80M`, pad_zero=False; the 800M
with `Config`, pad_zero=True). A file whose shapes match no release gets the official default
`Config` and a log line says so. Every setting can be overridden by the caller.
"""

from __future__ import annotations

import logging
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellfm.checkpoints.folder import state_mismatches, with_overrides, write_model_folder
from cellfm.checkpoints.mindspore_ckpt import read_mindspore_checkpoint
from cellfm.config import ModelConfig
from cellfm.model import CellFMModule
from cellfm.vocab import load_vocabulary
from cellfm.wording import arg

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


@dataclass(frozen=True)
class OfficialRelease:
    """What the authors' config.py says about one released model (`source`: its config class)."""

    name: str
    source: str
    vocabulary: str
    n_layers: int
    pad_zero: bool
    add_zero: bool = False
    d_model: int = 1536
    n_heads: int = 48


OFFICIAL_RELEASES: dict[str, OfficialRelease] = {
    "cellfm-80m": OfficialRelease("cellfm-80m", "Config_80M", "cellfm-27k", 2, pad_zero=False),
    "cellfm-800m": OfficialRelease("cellfm-800m", "Config", "cellfm-24k", 40, pad_zero=True),
}
# the official default `Config` (config.py), used for a file of no known release
DEFAULT_SETTINGS = {"pad_zero": True, "add_zero": False, "n_heads": 48, "d_model": 1536}


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


def _release_of(release: str | None, vocabulary: str, n_layers: int, d_model: int) -> OfficialRelease | None:
    if release is not None:
        if release not in OFFICIAL_RELEASES:
            raise ValueError(f"unknown official release {release!r}; known: {sorted(OFFICIAL_RELEASES)}")
        return OFFICIAL_RELEASES[release]
    for r in OFFICIAL_RELEASES.values():
        if (r.vocabulary, r.n_layers, r.d_model) == (vocabulary, n_layers, d_model):
            return r
    return None


def infer_config(state: dict[str, torch.Tensor], release: str | None = None, **overrides: Any) -> ModelConfig:
    """The config of an official state dict: shapes, then the settings of `release` (or of the
    release whose shapes match, or the official default `Config`), then `overrides`."""
    if "gene_emb" not in state:
        raise ValueError(f"no 'gene_emb' tensor: not a CellFM checkpoint (keys: {sorted(state)[:8]})")
    rows, d_model = state["gene_emb"].shape
    if rows not in VOCAB_BY_ROWS:
        raise ValueError(f"gene table has {rows} rows; official vocabularies give {sorted(VOCAB_BY_ROWS)}")
    vocabulary, n_genes = VOCAB_BY_ROWS[rows]
    layers = {k.split(".")[1] for k in state if k.startswith("encoder.") and k.endswith("q_proj.weight")}
    n_layers = len(layers)
    rel = _release_of(release, vocabulary, n_layers, d_model)
    settings = DEFAULT_SETTINGS if rel is None else {"pad_zero": rel.pad_zero, "add_zero": rel.add_zero,
                                                     "n_heads": rel.n_heads, "d_model": rel.d_model}
    add_zero = "value_dec.zero_logit.0.weight" in state  # the zero heads are in the file or not
    fields = {"pad_zero": settings["pad_zero"] and not add_zero, "add_zero": add_zero}
    if "n_heads" not in overrides:
        if d_model != settings["d_model"]:
            raise ValueError(f"d_model={d_model}: the number of heads is not stored in the checkpoint; "
                             f"pass {arg('n_heads', placeholder='heads')} (the official 80M and 800M models "
                             "use 48)")
        fields["n_heads"] = settings["n_heads"]
    if "pad_zero" not in overrides:
        where = (f"{rel.name} (official {rel.source})" if rel is not None else
                 f"no official release has these shapes (d_model={d_model}, {n_layers} layers, "
                 f"{vocabulary}): the official default Config")
        (log.info if rel is not None else log.warning)(
            "%s: pad_zero=%s, add_zero=%s; pass %s to change it", where, fields["pad_zero"], add_zero,
            arg("pad_zero", not fields["pad_zero"]))
    lora = state.get("encoder.0.attn.q_proj.lora_a")
    base = ModelConfig(
        n_genes=n_genes, vocabulary=vocabulary, d_model=d_model, n_layers=n_layers,
        n_heads=overrides.get("n_heads", fields.get("n_heads", 1)),
        value_bins=state["value_enc.w1.weight"].shape[0], lora_rank=0 if lora is None else lora.shape[0],
        add_zero=overrides.get("add_zero", fields["add_zero"]),
        pad_zero=overrides.get("pad_zero", fields["pad_zero"]), st_tokens="st.emb" in state,
    )
    return with_overrides(base, overrides)


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
    """Every tensor of an official file under its official name (MindSpore or torch.save)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    if zipfile.is_zipfile(path):  # torch.save format
        return read_torch_checkpoint(path)
    return read_mindspore_checkpoint(path)


def check_state_fits(config: ModelConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict that does not load into `CellFMModule(config)` (checked on the meta device)."""
    with torch.device("meta"):
        own = CellFMModule(config).state_dict()
    parts = state_mismatches(own, state)
    if parts:
        raise ValueError(f"{source} does not fit this model config: " + "; ".join(parts))


def read_official_checkpoint(
    path: str | Path, *, release: str | None = None, **overrides: Any
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) of an official checkpoint file; `overrides` are ModelConfig
    fields (e.g. `n_heads=`, `pad_zero=`), `release` names the official release it is."""
    tensors = read_official_tensors(path)
    if "extractor.gene_emb" in tensors:
        raise ValueError(f"{path} is an official annotation model (encoder under 'extractor.', a cell-type "
                         "head beside it): read it with cellfm.checkpoints.read_official_annotation")
    state, _ = split_official_state(tensors)
    config = infer_config(state, release, **overrides)
    check_state_fits(config, state, str(path))
    return config, state


def convert_checkpoint(
    src: str | Path, out_dir: str | Path, *, overwrite: bool = False, release: str | None = None,
    extra_json: dict[str, dict] | None = None, **overrides: Any,
) -> Path:
    """Official checkpoint -> our model folder (written atomically). Returns the folder."""
    config, state = read_official_checkpoint(src, release=release, **overrides)
    return write_model_folder(out_dir, config, state, load_vocabulary(config.vocabulary),
                              overwrite=overwrite, extra_json=extra_json)
