"""GPU check (benchmarks/gpu_check.sh): one table of what a GPU does with cellfm. Never run by tests.

Rows:
  embed    the `cellfm embed` model path (`cell_embedding` on length-sorted padded batches of the
           size `cellfm.embed` uses, or `cell_embedding_packed` on packs of a token budget) for
           the 80m and 800m shapes (random weights) on real PBMCs (pbmc4k, <= 2048 genes each),
           fp32 and bf16 autocast, torch.compile off / on (bf16, --compile-presets), and the two
           Kᵀ·V cores of the packed path (a grid, the CUDA default; a matmul per cell, the CPU
           default): cells/s, peak memory, achieved TFLOP/s and MFU = that / the GPU's bf16
           dense peak (FLOPs from benchmarks/flops.py);
  cosine   bf16 vs fp32 CLS embeddings of the same cells (min and mean cosine);
  train    one pretraining step (`cellfm pretrain`, max_steps 1, fp32) with DDP and FSDP2 on 1
           process, then 2 if there are 2 GPUs (nccl); its loss against the same step on CPU in
           fp32 (gloo for 2 processes), within --rtol.

`--device cpu --quick` runs every row small (tiny/small presets, few cells, gloo) to prove the
script end to end on a machine without a GPU; its numbers say nothing about GPUs.

    CELLFM_DATA_DIR=../shared/data python benchmarks/gpu_check.py            # on a GPU machine
    CELLFM_DATA_DIR=../shared/data python benchmarks/gpu_check.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flops import embed_flops, real_cells
from measure import PeakExtraRSS, matmul_peak_gflops, min_median, times
from real_cells import PBMC, data_dir, embed_batch_size

from cellfm.config import get_preset
from cellfm.model import CellFMModule

BF16_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
ROWS: list[tuple] = []
HEADER = ("check", "preset", "dtype", "path", "compile", "cells/s min|med", "peak mem GiB", "TFLOP/s",
          "MFU %", "result")


def row(*cells) -> None:
    ROWS.append(tuple(str(c) for c in cells))
    print("  " + " | ".join(ROWS[-1]), file=sys.stderr, flush=True)  # progress while it runs


def gpu_peak(dev: torch.device, given: float | None) -> tuple[float, str]:
    if given:
        return given * 1e12, "--peak-tflops"
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for key, peak in BF16_PEAK.items():
            if key in name:
                return peak, f"{name} bf16 dense"
        return float("nan"), f"{name}: unknown peak, pass --peak-tflops"
    gflops, _ = matmul_peak_gflops(sizes=(1024, 2048), repeats=3)
    return gflops * 1e9, "CPU fp32 torch.mm peak (measured)"


def padded(cells: list, batch_size: int, dev: torch.device) -> list[tuple]:
    order = sorted(range(len(cells)), key=lambda i: len(cells[i][1]))
    out = []
    for s in range(0, len(order), batch_size):
        group = [cells[i] for i in order[s : s + batch_size]]
        L = max(len(c[1]) for c in group)
        ids, vals = torch.zeros(len(group), L, dtype=torch.long), torch.zeros(len(group), L)
        for b, c in enumerate(group):
            ids[b, : len(c[1])] = torch.as_tensor(c[1])
            vals[b, : len(c[2])] = torch.as_tensor(c[2])
        out.append((ids.to(dev), vals.to(dev), (ids > 0).to(dev)))
    return out


def packed(cells: list, budget: int, dev: torch.device) -> list:
    from cellfm.tokenizer.packing import pack_cells, token_budget_groups

    order = sorted(range(len(cells)), key=lambda i: len(cells[i][1]))
    lens = [len(cells[i][1]) for i in order]
    return [pack_cells([torch.as_tensor(cells[order[i]][1]) for i in g],
                       [torch.as_tensor(cells[order[i]][2]) for i in g]).to(dev)
            for g in token_budget_groups(lens, budget)]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def embed_rows(preset: str, cells: list, dev: torch.device, peak: float, args) -> None:
    cfg = get_preset(preset)
    torch.manual_seed(0)
    with torch.device(dev):
        module = CellFMModule(cfg).eval()
    flops = sum(embed_flops(cfg, len(c[1])) for c in cells)
    bs = args.batch_size or embed_batch_size(dev.type)[0]
    packs = packed(cells, args.budget, dev)
    inputs = {"padded": padded(cells, bs, dev), "packed": packs}
    # the other Kᵀ·V core than the device's default (CUDA: a grid, CPU: a matmul per cell)
    other = "packed, per-cell loop" if dev.type == "cuda" else "packed, grid"
    inputs[other] = packs
    outs = {}
    for dtype in ("fp32", "bf16"):
        amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        for path, batches in inputs.items():
            compile_too = dtype == "bf16" and preset in args.compile_presets
            for comp in (False, True) if compile_too else (False,):
                is_packed = path.startswith("packed")
                fn = module.cell_embedding_packed if is_packed else module.cell_embedding
                if path == other:
                    fn = functools.partial(module.cell_embedding_packed, grid=dev.type != "cuda")
                loop = is_packed and (path == other) == (dev.type == "cuda")  # the per-cell matmul core
                if comp and loop:
                    row("embed", preset, dtype, f"{path} (<= {args.budget} tok)", "on", "-", "-", "-", "-",
                        "not run: the per-cell matmul loop recompiles for every new cell count "
                        "(CPU, tiny: 22-55 s each)")
                    continue
                if comp:  # the undecorated method: compiling under inference_mode fails in inductor
                    plain = (CellFMModule.cell_embedding_packed if is_packed else CellFMModule.cell_embedding)
                    fn = functools.partial(torch.compile(plain.__wrapped__, dynamic=True), module)
                    if is_packed:
                        fn = functools.partial(fn, grid=True)

                def run(fn=fn, batches=batches, amp=amp, is_packed=is_packed):
                    with torch.no_grad(), amp:  # the methods enter inference_mode themselves
                        res = [fn(b) if is_packed else fn(*b) for b in batches]
                    sync(dev)
                    return res

                label = f"padded (batch {bs})" if path == "padded" else f"{path} (<= {args.budget} tok)"
                try:
                    t0 = time.perf_counter()
                    outs[(dtype, path, comp)] = torch.cat(run()).float()  # warm-up (and compile)
                    warm = time.perf_counter() - t0
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    with PeakExtraRSS() as mem:
                        ts = times(run, repeats=args.repeats, warmup=0)
                    used = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else mem.extra * 2**20
                    gib = used / 2**30
                except Exception as err:  # a compile failure is a result, not a crash of the check
                    row("embed", preset, dtype, label, "on" if comp else "off", "-", "-", "-", "-",
                        f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
                    continue
                lo, med = min_median(ts)
                n = len(cells)
                row("embed", preset, dtype, label, "on" if comp else "off", f"{n / lo:.1f}|{n / med:.1f}",
                    f"{gib:.2f}", f"{flops / lo / 1e12:.2f}", f"{flops / lo / peak * 100:.1f}",
                    f"warm-up {warm:.1f} s")
    for path in inputs:
        if ("fp32", path, False) not in outs or ("bf16", path, False) not in outs:
            continue
        a, b = outs[("fp32", path, False)], outs[("bf16", path, False)]
        cos = F.cosine_similarity(a, b, dim=-1)
        row("cosine", preset, "bf16 vs fp32", path, "off", "-", "-", "-", "-",
            f"cos min {cos.min():.6f} mean {cos.mean():.6f} (1 - min {1 - cos.min():.1e})")
    for path in ("packed", other):
        if ("fp32", path, False) in outs and ("fp32", "padded", False) in outs:
            diff = (outs[("fp32", path, False)] - outs[("fp32", "padded", False)]).abs().max()
            row("= padded", preset, "fp32", path, "off", "-", "-", "-", "-", f"max |diff| {diff:.2e}")
    del module
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def train_config(corpus: Path, out: Path, preset: str, parallel: str, device: str, threads: int) -> Path:
    cfg = {"corpus_dir": str(corpus), "out_dir": str(out), "preset": preset, "batch_size": 8, "max_steps": 1,
           "warmup_steps": 0, "lr": 1e-4, "val_fraction": 0.0, "ckpt_every": 1, "log_every": 1,
           "parallel": parallel, "bf16": False, "device": device, "threads": threads, "progress": False,
           "model": {"dropout": 0.0}}
    path = out.with_suffix(".toml")
    lines = [f"{k} = {json.dumps(v)}" for k, v in cfg.items() if k != "model"]
    lines += ["[model]", "dropout = 0.0"]
    path.write_text("\n".join(lines) + "\n")
    return path


def step_loss(config: Path, nproc: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "cellfm.cli", "pretrain", "--config", str(config)]
    if nproc > 1 or "parallel = \"none\"" not in config.read_text():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "cellfm.cli", "pretrain", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if r.get("step") == 1 and "loss" in r)


def train_row(preset: str, what: str, result: str) -> None:
    row("train step", preset, "fp32", what, "off", "-", "-", "-", "-", result)


def train_rows(data: Path, dev: torch.device, args) -> None:
    preset = "tiny" if args.quick else args.train_preset
    n_dev = torch.cuda.device_count() if dev.type == "cuda" else 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        subprocess.run([sys.executable, "-m", "cellfm.cli", "corpus", "build", str(data / PBMC),
                        "-o", str(corpus), "-j", "1"], check=True, capture_output=True)
        for nproc in (1, 2) if n_dev >= 2 else (1,):
            ref_out = tmp / f"cpu_{nproc}"
            ref_cfg = train_config(corpus, ref_out, preset, "none" if nproc == 1 else "ddp", "cpu", 1)
            try:
                ref = step_loss(ref_cfg, nproc, ref_out)
            except RuntimeError as err:
                train_row(preset, f"cpu x{nproc}", f"failed: {err}")
                continue
            for parallel in ("ddp", "fsdp"):
                out = tmp / f"{parallel}_{nproc}"
                cfg = train_config(corpus, out, preset, parallel, "auto" if dev.type == "cuda" else "cpu", 1)
                backend = "nccl" if dev.type == "cuda" else "gloo"
                try:
                    loss = step_loss(cfg, nproc, out)
                except RuntimeError as err:
                    train_row(preset, f"{parallel} x{nproc} {backend}", f"failed: {err}")
                    continue
                rel = abs(loss - ref) / abs(ref)
                verdict = "OK" if rel <= args.rtol else "FAIL"
                train_row(preset, f"{parallel} x{nproc} {backend}",
                          f"loss {loss:.6f} vs CPU fp32 {ref:.6f}: rel {rel:.1e} {verdict}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small shapes and few cells (the CPU fallback)")
    p.add_argument("--data-dir", default=None, help="the shared data folder (default: $CELLFM_DATA_DIR)")
    p.add_argument("--presets", nargs="+", default=None, help="default 80m 800m (--quick: tiny small)")
    p.add_argument("--cells", type=int, nargs="+", default=None,
                   help="real cells per preset (default 2048 for 80m, 256 for 800m; --quick 32)")
    p.add_argument("--batch-size", type=int, default=None, help="padded batch (default: cellfm.embed's)")
    p.add_argument("--budget", type=int, default=65536, help="tokens per pack")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile-presets", nargs="*", default=None,
                   help="presets also timed with torch.compile in bf16 (default 80m; --quick tiny): "
                        "compiling the 40-layer 800m graph may not fit the 8 minutes")
    p.add_argument("--no-train", dest="train", action="store_false")
    p.add_argument("--train-preset", default="small")
    p.add_argument("--rtol", type=float, default=1e-3, help="train step loss vs CPU fp32")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 dense peak")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    presets = args.presets or (["tiny", "small"] if args.quick else ["80m", "800m"])
    default = [32] * len(presets) if args.quick else [2048 if p == "80m" else 256 for p in presets]
    counts = args.cells or default
    if args.compile_presets is None:
        args.compile_presets = ["tiny"] if args.quick else ["80m"]
    if args.quick:
        args.budget, args.repeats = min(args.budget, 8192), min(args.repeats, 2)
    data = data_dir(args.data_dir)
    peak, peak_src = gpu_peak(dev, args.peak_tflops)
    all_cells = real_cells(data / PBMC, "cellfm-27k", max(counts))
    t0 = time.perf_counter()
    for preset, n in zip(presets, counts, strict=False):
        embed_rows(preset, all_cells[:n], dev, peak, args)
    if args.train:
        train_rows(data, dev, args)
    lens = np.array([len(c[1]) for c in all_cells])
    print(f"cellfm GPU check: torch {torch.__version__}, device {dev}"
          f"{' (' + torch.cuda.get_device_name(dev) + ')' if dev.type == 'cuda' else ''}; MFU against "
          f"{peak / 1e12:.1f} TFLOP/s ({peak_src}); real PBMCs, median {np.median(lens):.0f} genes "
          f"(<= 2048); {args.repeats} timed repeats after a warm-up; {time.perf_counter() - t0:.0f} s")
    widths = [max(len(r[i]) for r in [HEADER, *ROWS]) for i in range(len(HEADER))]
    for r in [HEADER, tuple("-" * w for w in widths), *ROWS]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
