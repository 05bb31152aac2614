"""`CorpusLoader`: a DataLoader over a `CorpusDataset` that knows how many batches the training
loop has taken, so `state_dict()` is the exact resume point even with prefetching workers.

Worker processes hold copies of the dataset, so the dataset itself cannot count what the loop
consumed; this wrapper counts batches as they are handed out.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DataLoader

from cellfm.batch import CellBatch
from cellfm.corpus.dataset import CorpusDataset


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
        dl = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                        pin_memory=self.pin_memory, **kw)
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
