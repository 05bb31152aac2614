"""Timing and memory helpers shared by the benchmark scripts (the machine is shared: report the
min and the median of repeats, never one run)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import resource
import statistics
import threading
import time

import torch


def best_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    return min(times(fn, repeats, warmup))


def times(fn, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Seconds of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def min_median(ts: list[float]) -> tuple[float, float]:
    return min(ts), statistics.median(ts)


def matmul_peak_gflops(sizes=(2048, 3072, 4096), repeats: int = 5) -> tuple[float, int]:
    """Best fp32 GFLOP/s of a square torch.mm over a few sizes: the machine's practical peak."""
    best, best_n = 0.0, 0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        t = best_time(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), repeats=repeats)
        g = 2 * n**3 / t / 1e9
        if g > best:
            best, best_n = g, n
    return best, best_n


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakExtraRSS:
    """Largest RSS above the starting one while the block runs (sampled every 2 ms), so that two
    methods timed in one process each get their own peak."""

    def __enter__(self):
        self.base = self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())
        self.extra = self.peak - self.base


def in_fresh_process(fn, *args):
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
