"""A kill at any moment loses nothing: pretraining SIGKILLed in the middle of a checkpoint save
(after the DCP files, after the trainer state, while old checkpoints are pruned) and started again
ends with the same weights, bitwise, as an uninterrupted run; `corpus build` from a SOMA
experiment SIGKILLed in the middle of a shard and started again gives the same corpus and does not
rewrite the parts it had finished.

The kill lands where we want by running the command in a child process that wraps one function
(named in the test) so that it touches a marker file and sleeps; the test SIGKILLs the child when
the marker appears."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from soma_experiment import cells_for_soma, write_soma_experiment

from cellfm.corpus import CorpusManifest, ShardReader

CHILD = """
import importlib, sys, time
from functools import reduce
from pathlib import Path

module, _, attr = {target!r}.partition(":")
*path, name = attr.split(".")
owner = reduce(getattr, path, importlib.import_module(module))
marker, after_calls, after = Path({marker!r}), {after_calls}, {after!r}
original, calls = getattr(owner, name), [0]

def paused(*args, **kwargs):
    out = original(*args, **kwargs) if after else None
    calls[0] += 1
    if calls[0] > after_calls:
        marker.touch()
        time.sleep(600)
    return out if after else original(*args, **kwargs)

setattr(owner, name, paused)
from cellfm.cli import main
sys.argv = ["cellfm", *{argv!r}]
main()
"""


def _run_killed(argv: list[str], target: str, marker: Path, *, after: bool, after_calls: int = 0):
    """Run `cellfm ARGV` with `target` ("module:attr.path") wrapped so that its call number
    after_calls + 1 pauses (after the call when `after`, else before it); SIGKILL it there."""
    code = CHILD.format(target=target, marker=str(marker), after_calls=after_calls, after=after, argv=argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child ended before the kill point: {proc.stderr.read().decode()[-3000:]}")
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _cli(argv: list[str]) -> None:
    p = subprocess.run([sys.executable, "-m", "cellfm.cli", *argv], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]


def _config(path: Path, corpus: Path, out: Path) -> Path:
    cfg = dict(corpus_dir=str(corpus), out_dir=str(out), preset="tiny", batch_size=16, max_steps=12, lr=2e-3,
               start_lr=1e-5, min_lr=1e-4, warmup_steps=2, eval_every=100, eval_batches=1, ckpt_every=4,
               keep_checkpoints=1, log_every=2, threads=1, progress=False, val_fraction=0.05)
    text = "\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg.items())
    path.write_text(text + "\n[model]\ndropout = 0.1\n")
    return path


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("whole")
    _cli(["pretrain", "--config", str(_config(d / "c.toml", corpus, d / "run"))])
    return load_file(str(d / "run" / "model" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("target,after,after_calls", [
    ("torch.distributed.checkpoint:save", True, 1),  # 2nd save: DCP files written, no trainer state
    ("pathlib:Path.rename", False, 1),  # 2nd save complete in step_X.tmp, not renamed yet
    ("shutil:rmtree", False, 4),  # 2nd save renamed; the older checkpoint being removed
])
def test_pretraining_killed_mid_checkpoint_resumes_bitwise(target, after, after_calls, corpus, uninterrupted,
                                                           tmp_path):
    cfg = _config(tmp_path / "c.toml", corpus, tmp_path / "run")
    _run_killed(["pretrain", "--config", str(cfg)], target, tmp_path / "marker", after=after,
                after_calls=after_calls)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts and not (tmp_path / "run" / "model").exists(), ckpts
    _cli(["pretrain", "--config", str(cfg)])
    resumed = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    left = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert left == ["step_0000012"], left  # keep_checkpoints=1; no half-written folder left behind


@pytest.mark.slow
def test_soma_corpus_build_killed_mid_shard_resumes(shared_data, tmp_path):
    exp = write_soma_experiment(cells_for_soma(shared_data, per_dataset=120), tmp_path / "exp")
    argv = ["corpus", "build", str(exp), "-o", str(tmp_path / "c"), "-j", "1", "--shard-cells", "60"]
    # killed in the third part, its temporary shard file open and its rows about to be written
    _run_killed(argv + ["--max-genes", "0"], "cellfm.corpus.shards:_record_batch", tmp_path / "marker",
                after=True, after_calls=2)
    c = tmp_path / "c"
    assert list(c.glob(".*.arrow.tmp")) and not (c / "manifest.json").exists(), sorted(os.listdir(c))
    finished = {p.name: p.stat().st_mtime_ns for p in c.glob("*.arrow")}
    assert len(finished) == 2
    _cli(argv + ["--max-genes", "0"])
    assert all(p.stat().st_mtime_ns == finished[p.name] for p in c.glob("*.arrow") if p.name in finished)
    _cli(["corpus", "build", str(exp), "-o", str(tmp_path / "ref"), "-j", "1", "--shard-cells", "60",
          "--max-genes", "0"])
    a, b = CorpusManifest.load(c), CorpusManifest.load(tmp_path / "ref")
    shards = [[(s.file, s.n_cells, s.sha256) for s in m.shards] for m in (a, b)]
    assert shards[0] == shards[1]
    assert a.report.drop(columns="input").equals(b.report.drop(columns="input"))
    assert not list(c.glob(".*.tmp")) and len(a.shards) == 6
    assert ShardReader(c / a.shards[0].file).n_cells == a.shards[0].n_cells
