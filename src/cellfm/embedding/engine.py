"""The embedding engine: tokenized batches of a checked `CellInput` through the encoder, CLS out.

It knows tensors and devices, not files or AnnData fields: `embedding.memory` (AnnData in, obsm
out), `embedding.stream` (files, chunks, torchrun) and `CellFM.get_cell_embeddings` all run it.
CPU runs in float32, CUDA in bfloat16 autocast. With `st_tokens`, the two ST tokens of the authors'
fine-tuning model carry each cell's total (S = T, as at inference in the official code).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Protocol

import numpy as np
import torch

from cellfm.batch import CellBatch
from cellfm.config import ModelConfig
from cellfm.contract.setup import CellInput
from cellfm.model.st_tokens import st_features
from cellfm.progress import progress_bar
from cellfm.tokenizer.packing import token_budget_batches
from cellfm.vocab import GeneVocabulary
from cellfm.wording import UsageError, arg


class EncoderModel(Protocol):
    """What embedding needs of a model (`cellfm.CellFM` is one)."""

    config: ModelConfig
    vocab: GeneVocabulary
    module: torch.nn.Module

    @property
    def device(self) -> torch.device: ...


def default_batch_size(device: torch.device) -> int:
    """Cells per forward pass when none is given: 16 on CPU, where small batches stay in cache and
    carry less padding (cellfm-mini, 1 thread: 118 vs 103 cells/s at 64; two processes scale 1.96x
    instead of 1.72x, benchmarks/embed_scaling.py), 64 on a GPU."""
    return 16 if device.type == "cpu" else 64


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None / "auto" -> CUDA when available, else CPU; anything else is checked and taken as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        choices = f"{arg('device', 'cpu')}, {arg('device', 'cuda')} or {arg('device', 'auto')}"
        raise UsageError(f"{arg('device', str(device))} is not a device torch knows: use {choices}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{arg('device', str(device))} was asked for but torch sees no CUDA GPU (a CPU-only "
                         f"torch build?); use {arg('device', 'cpu')}")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"{arg('device', str(device))} is not supported: use "
                         f"{arg('device', 'cpu')} or {arg('device', 'cuda')}")
    return dev


def check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"{arg('batch_size', batch_size)}: the batch size must be positive")


def require_st_weights(model: EncoderModel) -> None:
    """Refuse `st_tokens=True` for a model without ST-token weights: new random ones would make
    the embedding noise, not a library-size signal."""
    if not model.config.st_tokens:
        raise UsageError(
            f"{arg('st_tokens', True)} needs a model with ST-token weights and this one has none; "
            "the official 80M release (cellfm-80m, CellFM_80M_weight.ckpt: ST_emb, ST_enc) and "
            "models fine-tuned for integration with ST tokens carry them. Leave out "
            f"{arg('st_tokens', True)} for this model"
        )


@contextmanager
def on_device(model: EncoderModel, dev: torch.device) -> Iterator[torch.nn.Module]:
    """The model's module in eval mode on `dev`; its mode and device are restored afterwards."""
    module = model.module
    was_training, old_device = module.training, model.device
    module.eval().to(dev)
    try:
        yield module
    finally:
        module.train(was_training).to(old_device)


def token_budget(device: torch.device) -> int:
    """Gene tokens per packed forward pass: 4,096 on CPU (80M shape, 1 thread: 1.5x the padded
    batches of 16, 8,192 gave 1.35x; benchmarks/embed.py --compare), 65,536 on a GPU (a guess
    until benchmarks/gpu_check.sh has measured it)."""
    return 4096 if device.type == "cpu" else 65536


def embed_batch(module: torch.nn.Module, batch: CellBatch, dev: torch.device, st_tokens: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, CLS embeddings (B, D) float32) of one CellBatch, padding-free: its cells are packed
    into token streams of at most `token_budget` genes (`cell_embedding_packed`, equal to the
    padded forward within 1e-5); bf16 autocast on CUDA."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    with torch.inference_mode(), autocast:
        cls = []
        for packed in token_budget_batches(batch, token_budget(dev)):  # cell order kept
            packed = packed.to(dev, non_blocking=True)
            st_feat = st_features(packed.totals) if st_tokens else None  # (b, 2)
            cls.append(module.cell_embedding_packed(packed, st_feat=st_feat))  # (b, D)
        return batch.cell_index.cpu().numpy(), torch.cat(cls).float().cpu().numpy()


def embed_batches(module: torch.nn.Module, batches: Iterable[CellBatch], out: np.ndarray, dev: torch.device,
                  *, offset: int = 0, st_tokens: bool = False, bar=None) -> None:
    """Fill `out[row - offset]` with the CLS of every cell of `batches` (rows not in a batch stay)."""
    for batch in batches:
        rows, cls = embed_batch(module, batch, dev, st_tokens=st_tokens)
        out[rows - offset] = cls
        if bar is not None:
            bar.update(len(rows))


def embed_cells(cells: CellInput, model: EncoderModel, *, batch_size: int | None = None,
                device: str | torch.device | None = None, st_tokens: bool = False,
                progress: bool = True) -> np.ndarray:
    """CLS embeddings (n_cells, d_model) float32 of every cell of `cells`, in row order; cells
    that express no matched gene get a zero row."""
    check_batch_size(batch_size)
    if st_tokens:
        require_st_weights(model)
    dev = resolve_device(device)
    out = np.zeros((cells.n_cells, model.config.d_model), dtype=np.float32)
    bar = progress_bar(cells.n_cells - len(cells.empty_cells), "cellfm embed", enabled=progress)
    try:
        with on_device(model, dev) as module:
            embed_batches(module, cells.batches(batch_size or default_batch_size(dev)), out, dev,
                          st_tokens=st_tokens, bar=bar)
    finally:
        bar.close()
    return out


def model_record(config: ModelConfig) -> dict:
    """The model's settings as the `uns` record of an embedding keeps them (scalars only)."""
    return {"vocabulary": config.vocabulary, **{k: v for k, v in config.to_dict().items()
                                                if isinstance(v, (int, float, str, bool))}}


def uns_key(key_added: str) -> str:
    """The `uns` key of an embedding's record: `key_added` without scanpy's "X_" prefix
    ("X_cellfm" -> "cellfm"), so two models embedded under two keys keep two records."""
    return key_added.removeprefix("X_") or key_added
