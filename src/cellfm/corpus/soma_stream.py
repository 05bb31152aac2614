"""Pretraining batches read straight from a SOMA query with TileDB-SOMA-ML, beside our shards.

`SomaStreamDataset` wraps `tiledbsoma_ml.ExperimentDataset`: the library partitions the query's
cells over DDP ranks (RANK / WORLD_SIZE) and DataLoader workers and shuffles them in chunks; each
of its mini-batches becomes one `CellBatch` by the same steps as a corpus build then a corpus read
(raw-count check, `scale_library` over all genes, vocabulary genes only, cells with fewer than
`min_genes` dropped, `tokenize_batch` with each cell's generator keyed by its soma_joinid). So a
cell gets the same tokens here as from a corpus built from the same query (where its source row
is its soma_joinid). The epoch's order is the library's for seed (seed, epoch).

`SomaStreamLoader` counts the mini-batches the loop took, so `state_dict()` is an exact resume
point; on resume each worker skips its share of the consumed mini-batches without tokenizing them.
Import once and train from shards when you can: this path reads every epoch from SOMA.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cellfm.batch import CellBatch
from cellfm.contract.counts import raw_count_problem
from cellfm.corpus.builder import MIN_MATCHED_FRACTION, _gene_columns
from cellfm.corpus.dataset import tokenize_batch
from cellfm.corpus.loader import CorpusLoader
from cellfm.corpus.shards import split_hash
from cellfm.corpus.soma import INSTALL_HINT, SomaQuery, open_experiment, select_cells
from cellfm.corpus.vocabulary_link import load_vocabulary
from cellfm.io.readers import CountSource
from cellfm.tokenizer import scale_library


class SomaStreamDataset(IterableDataset):
    """Tokenized, masked pretraining batches of a SOMA query (see the module docstring).

    Parameters
    ----------
    query
        Experiment, measurement, raw-count layer and obs filter (`cellfm.corpus.soma.SomaQuery`).
    vocab
        Vocabulary name or object of the model.
    seed, epoch, batch_size, max_genes, mask_ratio, hide_fraction, mask
        As `CorpusDataset`.
    min_genes
        Cells with fewer expressed vocabulary genes are left out of their batch (the corpus
        builder's filter; cells above `max_genes` are sampled by the tokenizer).
    split, val_fraction
        ``"train"`` / ``"val"`` / ``"all"``: the held-out split by the same hash as a corpus built
        from the query (source = the query's name, cell id = obs_id or soma_joinid).
    io_batch_size, shuffle_chunk_size, shuffle
        Passed to `tiledbsoma_ml.ExperimentDataset`.
    """

    def __init__(self, query: SomaQuery, *, vocab: object = "cellfm-27k", seed: int = 0, epoch: int = 0,
                 batch_size: int = 32, max_genes: int = 2048, min_genes: int = 200, mask_ratio: float = 0.2,
                 hide_fraction: float = 0.8, mask: bool = True, split: str = "all", val_fraction: float = 0.0,
                 io_batch_size: int = 8192, shuffle_chunk_size: int = 64, shuffle: bool = True) -> None:
        super().__init__()
        try:
            import tiledbsoma
            from tiledbsoma_ml import ExperimentDataset
        except ImportError as err:
            raise ImportError(f"streaming from SOMA needs tiledbsoma-ml: {INSTALL_HINT}") from err
        if split not in ("all", "train", "val"):
            raise ValueError(f"split must be all, train or val, not {split!r}")
        self.query, self.seed, self.epoch, self.batch_size = query, seed, epoch, batch_size
        self.max_genes, self.min_genes, self.mask = max_genes, min_genes, mask
        self.mask_ratio, self.hide_fraction = mask_ratio, hide_fraction
        sel = select_cells(query)
        genes = CountSource(sel.query.where, "soma", sel.feature_names, np.array([], object),
                            lambda size: iter(()), var_ids=sel.feature_ids)
        self.cols, self.tokens = _gene_columns(genes, load_vocabulary(vocab))  # var positions, token ids
        if len(self.cols) < max(1, MIN_MATCHED_FRACTION * len(sel.feature_names)):
            raise ValueError(f"only {len(self.cols)} of {len(sel.feature_names)} genes of {query.where} "
                             "match the vocabulary")
        ids = sel.obs_joinids
        if split != "all":
            with open_experiment(query) as exp:
                col = sel.id_column or "soma_joinid"
                names = (exp.obs.read(coords=(ids,), column_names=["soma_joinid", col]).concat().to_pandas()
                         .set_index("soma_joinid").reindex(ids)[col].astype(str).tolist()
                         if sel.id_column else ids.astype(str).tolist())
            limit = np.uint64(min(int(val_fraction * 2**64), 2**64 - 1))
            in_val = split_hash(query.name, names) < limit
            ids = ids[in_val if split == "val" else ~in_val]
        self.n_cells = len(ids)
        with open_experiment(query) as exp:
            obs_query = tiledbsoma.AxisQuery(coords=(ids,))
            with exp.axis_query(query.measurement, obs_query=obs_query) as q:
                # the library's dataset: partitioning over ranks / workers, chunked shuffle
                self.inner = ExperimentDataset(q, layer_name=query.layer, batch_size=batch_size,
                                               io_batch_size=io_batch_size, shuffle=shuffle,
                                               shuffle_chunk_size=shuffle_chunk_size, seed=seed,
                                               return_sparse_X=True)
        self.start_batch = 0
        self.yield_empty = False  # set by SomaStreamLoader: a batch left without cells yields None

    @property
    def batches_per_rank(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_batch = epoch, 0

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.start_batch if batches_consumed is None
                else batches_consumed, "seed": self.seed, "batch_size": self.batch_size,
                "n_cells": self.n_cells, "source": self.query.key}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "batch_size", "n_cells"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"cannot resume: {k}={state[k]} in the state, {getattr(self, k)} here")
        self.epoch, self.start_batch = int(state["epoch"]), int(state["batches_consumed"])

    def __iter__(self) -> Iterator[CellBatch | None]:
        from attrs import evolve

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        skip = max(0, -(-(self.start_batch - wid) // nw))  # this worker's share of the consumed batches
        # torch cannot send sparse tensors from workers (the library refuses): dense rows there
        epoch_seed = int(np.random.default_rng([self.seed, self.epoch, 0x534F]).integers(2**31))
        inner = evolve(self.inner, seed=epoch_seed, return_sparse_X=info is None)
        for i, (x, obs) in enumerate(inner):
            if i < skip:
                continue
            batch = self.tokenize(x, obs["soma_joinid"].to_numpy(np.int64))
            if batch is not None or self.yield_empty:
                yield batch

    def tokenize(self, x, joinids: np.ndarray) -> CellBatch | None:
        """One mini-batch (cells x all genes of the query) -> CellBatch, None when no cell passes."""
        import scipy.sparse as sp

        x = sp.csr_matrix(x, dtype=np.float64)  # (n, n_vars)
        why = raw_count_problem(x)
        if why is not None:
            raise ValueError(f"{self.query.where}: cells {joinids[:3].tolist()}...: {why}")
        m = scale_library(x)[:, self.cols]  # (n, n_matched), columns in token order
        m.eliminate_zeros()
        m.sort_indices()
        keep = np.flatnonzero(np.diff(m.indptr) >= self.min_genes)
        if len(keep) == 0:
            return None
        m = m[keep]
        return tokenize_batch(joinids[keep], m.indptr.astype(np.int64), self.tokens[m.indices],
                              m.data.astype(np.uint32), seed=self.seed, epoch=self.epoch,
                              max_genes=self.max_genes, mask=self.mask, mask_ratio=self.mask_ratio,
                              hide_fraction=self.hide_fraction)


class SomaStreamLoader(CorpusLoader):
    """`experiment_dataloader` over a `SomaStreamDataset`; resumable mid-epoch as `CorpusLoader`
    (whose epoch and state methods it shares)."""

    def __init__(self, dataset: SomaStreamDataset, num_workers: int = 0) -> None:
        super().__init__(dataset, num_workers=num_workers)

    def __len__(self) -> int:
        return self.dataset.batches_per_rank - self.dataset.start_batch

    def __iter__(self) -> Iterator[CellBatch]:
        from tiledbsoma_ml import experiment_dataloader

        self.consumed = self.dataset.start_batch
        self.dataset.yield_empty = True
        kw = {"persistent_workers": False} if self.num_workers else {}
        # own generator: the DataLoader's base seed must not advance the global torch RNG (resume)
        dl = experiment_dataloader(self.dataset, num_workers=self.num_workers,
                                   generator=torch.Generator().manual_seed(self.dataset.seed), **kw)
        for batch in dl:
            self.consumed += 1
            if batch is not None:
                yield batch
