"""`CorpusLoader`: a DataLoader over a `CorpusDataset` that knows how many batches the training
loop has taken, so `state_dict()` is the exact resume point even with prefetching workers.

Worker processes hold copies of the dataset, so the dataset itself cannot count what the loop
consumed; this wrapper counts batches as they are handed out.

Its worker processes also keep freed buffers in the malloc heap (`keep_freed_memory`): every batch
allocates a few MB of arrays, and by default glibc returns such blocks to the OS at once, so the
next batch page-faults fresh memory; on virtual machines that made tokenization 2-3x slower.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from cellfm.batch import CellBatch
from cellfm.corpus.dataset import CorpusDataset

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper limit on 64-bit


def keep_freed_memory() -> bool:
    """Serve blocks below 32 MB from the heap and do not trim it (glibc only; False elsewhere).

    Called in loader worker processes; call it in a training process that tokenizes in-process
    (num_workers=0) for the same effect. The cost is a process that keeps its peak heap.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX))
    except (OSError, AttributeError):
        return False


def _init_worker(worker_id: int) -> None:
    keep_freed_memory()


class CorpusLoader:
    """Iterate batches of `dataset` with `num_workers` processes; resumable mid-epoch.

    Examples
    --------
    >>> loader = CorpusLoader(CorpusDataset("corpus/", batch_size=64), num_workers=2)  # doctest: +SKIP
    >>> for step, batch in enumerate(loader): ...  # doctest: +SKIP
    >>> state = loader.state_dict()  # save it; later loader.load_state_dict(state)  # doctest: +SKIP
    """

    def __init__(self, dataset: CorpusDataset, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None) -> None:
        self.dataset = dataset
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.consumed = dataset.start_batch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[CellBatch]:
        self.consumed = self.dataset.start_batch
        kw = {"prefetch_factor": self.prefetch_factor} if self.num_workers and self.prefetch_factor else {}
        # Own generator: DataLoader draws a base seed from it, which would otherwise advance the
        # global torch RNG (dropout) and break bitwise resume; batches do not depend on it.
        dl = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                        pin_memory=self.pin_memory, worker_init_fn=_init_worker,
                        generator=torch.Generator().manual_seed(self.dataset.seed), **kw)
        for batch in dl:
            self.consumed += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.consumed = 0

    def state_dict(self) -> dict:
        return self.dataset.state_dict(batches_consumed=self.consumed)

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self.consumed = self.dataset.start_batch
