"""Encoder outputs of reference cells, computed once and reused by every epoch of frozen-mode
head training.

The official annotation head reads every gene token, so a frozen encoder's per-token states are
kept, not only the CLS vector: float16, packed without padding (one row per expressed gene), in
memory up to `memory_limit` bytes and otherwise in a memory-mapped file in a temporary folder that
is removed with the object. Measured on pbmc3k (2,638 cells, 508,820 tokens, cache 124 MiB) with
cellfm-mini, one CPU thread (benchmarks/annotation.py): encoder pass 14.9 s, one head epoch on the
cache 5.0 s (2,374 cells, forward + backward, and 264 validation cells); recomputing the encoder
every epoch would cost 18.4 s per epoch, so the states are cached.

With ST tokens (`st_tokens=True`, the authors' fine-tuning model) the encoder sees
[CLS, ST, ST] + genes; the heads read CLS and the gene tokens, so the ST rows are left out here
(`encoder_states`), as the authors' port leaves them out of its classifier.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from cellfm.batch import CellBatch
from cellfm.contract.setup import CellInput
from cellfm.embedding.engine import EncoderModel
from cellfm.model.st_tokens import st_features
from cellfm.progress import progress_bar


def encoder_states(module: torch.nn.Module, batch: CellBatch, st_tokens: bool = False) -> torch.Tensor:
    """Last-layer states (B, 1+L, D) of a CellBatch: CLS, then the gene tokens. With `st_tokens`
    the two ST tokens (S = T = the cell's total) join the sequence but not the result."""
    st_feat = st_features(batch.totals) if st_tokens else None  # (B, 2)
    states, _ = module.encode(batch.gene_ids, batch.values, batch.token_mask, st_feat=st_feat)  # (B, P+L, D)
    if st_tokens:
        states = torch.cat([states[:, :1], states[:, 3:]], dim=1)  # drop the ST rows
    return states


class TokenStates:
    """CLS (N, D) float32 and packed token states (sum of lengths, D) float16 of N cells."""

    def __init__(self, cls: np.ndarray, lengths: np.ndarray, tokens: np.ndarray, tmpdir=None) -> None:
        self.cls = cls
        self.lengths = lengths.astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.tokens = tokens
        self._tmpdir = tmpdir  # keeps a memory-mapped file alive

    def __len__(self) -> int:
        return len(self.cls)

    @property
    def on_disk(self) -> bool:
        return isinstance(self.tokens, np.memmap)

    @classmethod
    def compute(
        cls,
        cells: CellInput,
        model: EncoderModel,
        device: torch.device,
        *,
        keep_tokens: bool = True,
        batch_size: int = 64,
        memory_limit: int = 2 << 30,
        progress: bool = True,
        desc: str = "cellfm encode",
        st_tokens: bool = False,
    ) -> TokenStates:
        """Run the encoder once over checked cells (`cellfm.contract.setup_cells`). Cells without
        any matched gene get a zero CLS and no tokens. `keep_tokens=False` keeps only the CLS (for
        CLS-only heads); `st_tokens` feeds the model's ST tokens (see `encoder_states`); `desc`
        names the progress bar (what is encoded)."""
        config, module = model.config, model.module
        n_expr = cells.n_tokens()
        lengths = n_expr if keep_tokens else np.zeros_like(n_expr)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        shape = (int(offsets[-1]), config.d_model)
        tmpdir = None
        if shape[0] * shape[1] * 2 > memory_limit:
            tmpdir = tempfile.TemporaryDirectory(prefix="cellfm-token-states-")
            tokens = np.lib.format.open_memmap(Path(tmpdir.name) / "tokens.npy", "w+", np.float16, shape)
        else:
            tokens = np.empty(shape, np.float16)
        cls_out = np.zeros((cells.n_cells, config.d_model), np.float32)
        was_training, old_device = module.training, model.device
        module.eval().to(device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        bar = progress_bar(int((n_expr > 0).sum()), desc, enabled=progress)
        try:
            with torch.inference_mode(), autocast:
                for b in cells.batches(batch_size):
                    b = b.to(device)
                    states = encoder_states(module, b, st_tokens)  # (B, 1+L, D)
                    rows = b.cell_index.cpu().numpy()
                    cls_out[rows] = states[:, 0].float().cpu().numpy()
                    if keep_tokens:
                        tok = states[:, 1:].to(torch.float16).cpu().numpy()
                        mask = b.token_mask.cpu().numpy()
                        for j, r in enumerate(rows):
                            tokens[offsets[r] : offsets[r + 1]] = tok[j, mask[j]]
                    bar.update(len(rows))
        finally:
            bar.close()
            module.train(was_training).to(old_device)
        return cls(cls_out, lengths, tokens, tmpdir)

    def batch(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """States (B, 1 + L, D) float32 with CLS first, padded to the longest cell, and the
        token mask (B, L) of the cells `rows`."""
        lens = self.lengths[rows]
        B, L, D = len(rows), int(lens.max(initial=0)), self.cls.shape[1]
        states = np.zeros((B, 1 + L, D), np.float32)
        states[:, 0] = self.cls[rows]
        for j, r in enumerate(rows):
            states[j, 1 : 1 + lens[j]] = self.tokens[self.offsets[r] : self.offsets[r + 1]]
        mask = np.arange(L)[None, :] < lens[:, None]
        return torch.from_numpy(states).to(device), torch.from_numpy(mask).to(device)

    def feature_stats(self, rows: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, ...]:
        """(CLS mean, CLS sd, token mean, token sd), each (D,) float32, over the cells `rows` (the
        training cells): per-feature statistics of the two kinds of state, accumulated in float64."""
        cls = self.cls[rows].astype(np.float64)
        d = cls.shape[1]
        s, ss, n = np.zeros(d), np.zeros(d), 0
        for a in range(0, len(rows), chunk):
            parts = [self.tokens[self.offsets[r] : self.offsets[r + 1]] for r in rows[a : a + chunk]]
            t = np.concatenate(parts).astype(np.float64) if parts else np.zeros((0, d))
            s, ss, n = s + t.sum(0), ss + (t * t).sum(0), n + len(t)
        t_mean = s / max(n, 1)
        t_sd = np.sqrt(np.maximum(ss / max(n, 1) - t_mean**2, 0.0))
        out = (cls.mean(0), cls.std(0), t_mean, t_sd if n else np.ones(d))
        return tuple(np.asarray(x, np.float32) for x in out)

    def length_batches(self, rows: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Shuffled batches of cells of similar length (little padding): shuffle, sort within
        pools of 50 batches by length, cut, shuffle the batches."""
        rows = rng.permutation(rows)
        pool = 50 * batch_size
        out = []
        for a in range(0, len(rows), pool):
            chunk = rows[a : a + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            out += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        return [out[i] for i in rng.permutation(len(out))]
