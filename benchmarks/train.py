"""Pretraining throughput: tokens/s for 1 process and for 2 processes (DDP and FSDP2) on CPU.

Writes a synthetic corpus (default 200k cells x ~1.8k expressed genes, with the real shard writer
of `benchmarks/loader.py`), then runs `cellfm pretrain` on it: one process with one thread, and
`torchrun --nproc-per-node 2` with one thread each, so "per core" scaling is
tokens/s(2 processes) / (2 x tokens/s(1 process)). Tokens are expressed genes entering the
encoder (padding excluded); the first `--skip` steps (start-up, allocator warm-up) are left out.
On a GPU machine pass `--device cuda` to time one GPU (the 2-process rows need 2 GPUs).

    python benchmarks/train.py --cells 200000 --dir /tmp/cellfm-bench-train
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from loader import write_synthetic_corpus  # noqa: E402


def run(corpus: Path, out: Path, *, procs: int, parallel: str, preset: str, batch: int, steps: int,
        device: str, threads: int) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    toml = out.parent / f"{out.name}.toml"
    toml.write_text(f'corpus_dir = "{corpus}"\nout_dir = "{out}"\npreset = "{preset}"\n'
                    f"batch_size = {batch}\nmax_steps = {steps}\nwarmup_steps = 1\nlr = 1e-4\n"
                    f'val_fraction = 0.0\nckpt_every = 100000\nlog_every = 1\nparallel = "{parallel}"\n'
                    f'device = "{device}"\nthreads = {threads}\nprogress = false\n')
    launch = [sys.executable, "-m", "cellfm.cli"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
         "-m", "cellfm.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([*launch, "pretrain", "--config", str(toml)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"loss"' in x]


def tokens_per_s(log: list[dict], skip: int) -> float:
    a, b = log[skip - 1], log[-1]
    return (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=1800, help="mean expressed genes per cell")
    p.add_argument("--dir", type=Path, default=Path("/tmp/cellfm-bench-train"))
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--batch", type=int, default=8, help="cells per process per step")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", action="store_true", help="keep the corpus for the next run")
    a = p.parse_args()

    corpus = a.dir / "corpus"
    if not (corpus / "manifest.json").is_file():
        t = time.perf_counter()
        write_synthetic_corpus(corpus, a.cells, mean_genes=a.genes)
        print(f"wrote {a.cells} synthetic cells in {time.perf_counter() - t:.0f} s")
    rows = []
    for preset in a.presets.split(","):
        one = tokens_per_s(run(corpus, a.dir / f"{preset}-1", procs=1, parallel="none", preset=preset,
                               batch=a.batch, steps=a.steps, device=a.device, threads=1), a.skip)
        rows.append((preset, "1 process", one, 1.0))
        for parallel in ("ddp", "fsdp"):
            two = tokens_per_s(run(corpus, a.dir / f"{preset}-2{parallel}", procs=2, parallel=parallel,
                                   preset=preset, batch=a.batch, steps=a.steps, device=a.device, threads=1),
                               a.skip)
            rows.append((preset, f"2 processes {parallel}", two, two / (2 * one)))
    print(f"\ntraining throughput, batch {a.batch} cells/process, ~{a.genes} genes/cell, {a.device}, "
          f"1 thread/process, {os.cpu_count()} cores")
    print(f"{'preset':8s} {'run':20s} {'tokens/s':>10s} {'scaling/core':>13s}")
    for preset, name, tps, eff in rows:
        print(f"{preset:8s} {name:20s} {tps:10.0f} {eff:12.0%}")
    if not a.keep:
        shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
