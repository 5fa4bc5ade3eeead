"""Timing and peak memory of one benchmark case, run in its own process.

A case is ``make_inputs() -> tuple`` plus ``step(*inputs) -> loss tensor`` (forward + backward inside).
``measure`` runs one warm-up (compilation, caches) and ``repeats`` timed runs, each on fresh inputs;
peak memory is the largest increase over what was resident when each run started (see bench.memory).
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.memory import PeakMemory


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(make_inputs, step, device: str, repeats: int = 3) -> dict:
    times, peaks, totals = [], [], []
    out = None
    first_s = 0.0
    for i in range(repeats + 1):
        inputs = make_inputs()
        _sync(device)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            out = step(*inputs)
            _sync(device)
            elapsed = time.perf_counter() - t0
        if i:  # the first run is the warm-up (and, for torch.compile, the compilation)
            times.append(elapsed)
            peaks.append(mem.peak_bytes)
            totals.append(mem.total_peak_bytes)
        else:
            first_s = elapsed
        del inputs
    return dict(
        median_s=statistics.median(times),
        min_s=min(times),
        max_s=max(times),
        first_s=first_s,
        peak_bytes=max(peaks),
        total_peak_bytes=max(totals),
        value=float(out.detach().double().sum()) if out is not None else float("nan"),
    )
