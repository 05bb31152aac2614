"""Which cells form which batch on which rank in an epoch, and each cell's random generator.

Everything here is a pure function of (seed, epoch, shard sizes, world size, batch size), so every
rank and every DataLoader worker computes the same plan without talking to the others, and the
tokens of a cell never depend on how many workers or ranks there are.

Epoch order: shards in a permuted order, taken `mix_shards` at a time (a window); the cells of
a window's shards are permuted together and the windows concatenated (a stream of N cells). So a
batch mixes cells of up to `mix_shards` source shards instead of holding one file's cells, which
would make consecutive steps chase one data set after another; with at most `mix_shards` shards
the whole epoch is one uniform shuffle, and memory for the permutation stays O(window cells).
The stream is cut into `n_rank_batches * world_size` consecutive batches and batch k goes to
rank k % world_size, so each rank has the same number of batches (DDP needs it).
Tail handling:
- ``"even"`` (default): the N cells are spread over the batches as evenly as possible (sizes
  differ by at most one, all equal `batch_size` when `world_size * batch_size` divides N): every
  cell exactly once, none repeated or lost.
- ``"drop"``: only full batches; the last `N mod (world_size * batch_size)` cells of the epoch's
  order are skipped (different cells each epoch, since the order is reshuffled).
"""

from __future__ import annotations

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic): a cheap, good 64-bit mixer."""
    with np.errstate(over="ignore"):
        z = (np.asarray(x, np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def cell_states(seed: int, epoch: int, cell_index: np.ndarray) -> list[tuple[int, int]]:
    """PCG64 (state, inc) per cell, from (seed, epoch, global cell index)."""
    base = _splitmix(_splitmix(np.uint64(seed)) ^ np.uint64(epoch))
    hi = _splitmix(base ^ np.asarray(cell_index, np.uint64))
    lo = _splitmix(hi ^ np.uint64(0xD1B54A32D192ED03))
    inc = (int(_splitmix(np.uint64(seed) + np.uint64(1))) << 64) | 1
    return [((int(h) << 64) | int(low), inc) for h, low in zip(hi, lo, strict=True)]


def set_pcg_state(bitgen: np.random.PCG64, state: tuple[int, int]) -> None:
    bitgen.state = {"bit_generator": "PCG64", "state": {"state": state[0], "inc": state[1]},
                    "has_uint32": 0, "uinteger": 0}


def cell_generator(seed: int, epoch: int, cell_index: int) -> np.random.Generator:
    """The generator of one cell; the loader's fast path re-seats one PCG64 to the same states."""
    bitgen = np.random.PCG64()
    set_pcg_state(bitgen, cell_states(seed, epoch, np.array([cell_index]))[0])
    return np.random.Generator(bitgen)


def shard_order(seed: int, epoch: int, n_shards: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(n_shards)


def window_order(seed: int, epoch: int, window: int, n_cells: int) -> np.ndarray:
    """Permutation of the `n_cells` cells of one window of shards."""
    return np.random.default_rng([seed, epoch, 0x524F, window]).permutation(n_cells)


def batch_bounds(n_cells: int, world_size: int, batch_size: int, tail: str = "even") -> np.ndarray:
    """(n_rank_batches * world_size + 1,) stream positions where global batches start; batch k is
    positions [b[k], b[k+1]) and belongs to rank k % world_size."""
    per_round = world_size * batch_size
    if tail == "even":
        n_rank = -(-n_cells // per_round)
        parts = n_rank * world_size
        if n_cells < parts:
            raise ValueError(f"{n_cells} cells cannot fill {parts} non-empty batches")
        return (np.arange(parts + 1, dtype=np.int64) * n_cells) // parts
    if tail == "drop":
        parts = (n_cells // per_round) * world_size
        return np.arange(parts + 1, dtype=np.int64) * batch_size
    raise ValueError(f"tail must be 'even' or 'drop', not {tail!r}")
