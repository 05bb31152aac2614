"""Shared test fixtures.

Real data lives in `shared/data` beside the checkout (CI has it there); set CELLFM_DATA_DIR to
point elsewhere. Tests that need it skip with the reason when it is absent, except under CI=true,
where a missing folder fails them: CI must not pass by skipping the real-data tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("CELLFM_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        why = (f"real data folder {path} not found: put the shared/data folder beside the checkout "
               "or set CELLFM_DATA_DIR (see README, 'Test data')")
        if in_ci():
            pytest.fail(f"CI=true: {why}", pytrace=False)
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A saved random `tiny` model (seed 0): fast stand-in for a real one in CLI tests (read only)."""
    import torch

    import cellfm

    torch.manual_seed(0)
    return cellfm.CellFM.from_preset("tiny").save(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def tiny():
    """A random `tiny` CellFM (seed 0), for tests of the workflows around the model."""
    import torch

    import cellfm

    torch.manual_seed(0)
    return cellfm.CellFM.from_preset("tiny")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests (on a shared 2-core machine OpenMP
    hand-offs dominate their matmuls); the thread count is restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory) -> Path:
    """A pretraining corpus of the real pbmc68k_reduced cells (3 shards)."""
    from cellfm.corpus import build_corpus

    out = tmp_path_factory.mktemp("corpus")
    build_corpus([shared_data / "pbmc68k_reduced_scanpy" / "pbmc68k_reduced_counts.h5ad"], out,
                 workers=1, shard_cells=300, progress=False)
    return out
