"""Peak-memory measurement shared by the benchmark scripts.

On the CPU the peak is the process's resident-set high-water mark (VmHWM), which Linux lets us reset
(``echo 5 > /proc/self/clear_refs``), so a case measures its own peak above what was resident when it
started, less the idle gradient buffers the native backend keeps for reuse: those are resident but
free, like the blocks CUDA's caching allocator reserves, and a case that reuses one must be charged for
it. On CUDA it is torch.cuda.max_memory_allocated above the allocation at the start.
Each case should run in a fresh process (see ``run_isolated``) so that allocator caches from other cases
do not hide or inflate its peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def _native_idle_bytes() -> int:
    """Bytes of recycled gradient buffers the native backend holds idle (0 when it is not loaded)."""
    native = sys.modules.get("safedpo_kernels.native")
    if native is None or not native.is_loaded():  # never build the extension just to measure
        return 0
    return native.cache_info()["idle_bytes"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Context manager; ``.peak_bytes`` is the peak increase above the memory in use at entry, and on
    CUDA ``.total_peak_bytes`` the peak of everything allocated (inputs and weights included), the
    measure other libraries publish (Liger-Kernel's benchmarks report torch.cuda.max_memory_allocated)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.total_peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._start = _status_kib("VmRSS") * 1024 - _native_idle_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.total_peak_bytes = torch.cuda.max_memory_allocated()
            self.peak_bytes = self.total_peak_bytes - self._start
        else:
            self.peak_bytes = _status_kib("VmHWM") * 1024 - self._start
        return False


def run_isolated(module: str, *args: str, timeout: int = 900) -> dict:
    """Run ``python -m module *args`` in a fresh process; it must print one JSON object last."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=timeout,
                         cwd=root)
    if res.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


class AllocationPeak:
    """Context manager; ``.bytes`` is the peak of live CPU tensor bytes allocated while it is open (above
    what was live at entry), from torch.profiler's allocation events.

    Deterministic: it adds up the byte counts of every allocation and free PyTorch's CPU allocator
    reports (including temporaries inside ops), in order, and keeps the highest running total -- what a
    resident-set measure cannot give when the C library keeps freed memory for reuse or hands it back,
    depending on the history of the process.
    """

    def __enter__(self) -> "AllocationPeak":
        from torch.profiler import ProfilerActivity, profile

        self.bytes = 0
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        self.bytes = _allocation_peak(self._prof)


def profiled_peak_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated while fn() runs (see AllocationPeak)."""
    with AllocationPeak() as peak:
        fn()
    return peak.bytes


def _allocation_peak(prof) -> int:
    sizes = []

    def walk(node):
        if node.tag.name == "Allocation":
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(sizes, key=lambda e: e[0]):
        live += size
        peak = max(peak, live)
    return peak


class AllReducedBytes:
    """Bytes this process all-reduces through ``torch.distributed.all_reduce`` while the context is open
    (the kernels' collectives call it): ``with AllReducedBytes() as sent: ...; sent.bytes``."""

    def __enter__(self) -> "AllReducedBytes":
        import torch.distributed as dist

        self.bytes = 0
        self._dist, self._original = dist, dist.all_reduce

        def counted(t, *args, **kwargs):
            self.bytes += t.numel() * t.element_size()
            return self._original(t, *args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc) -> None:
        self._dist.all_reduce = self._original
