"""Backend "native": builds, caches and loads the C++ CPU kernels of csrc/.

The extension is compiled on first use with torch.utils.cpp_extension (ninja), into
``$SAFEDPO_CACHE_DIR`` (default ``~/.cache/safedpo_kernels``) under a name derived from the source,
the flags and the torch version: later processes load the cached library without building, and any
change to the source builds a fresh one. Without a compiler (or with a failed build) a one-time warning
is issued and "auto" falls back to backend "torch". ``SAFEDPO_NATIVE=0`` turns the backend off.

Gradient buffers of ``sequence_logps``'s backward are recycled, as CUDA's caching allocator does: a
freed buffer stays with this process (counted in its RSS) for the next backward of a similar size,
which then skips the page faults a fresh multi-GB allocation takes. Idle buffers are kept up to
``$SAFEDPO_CPU_GRAD_CACHE_MB`` (default: a quarter of physical memory; 0 turns recycling off);
``empty_cache()`` returns them to the OS.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from . import torch_chunked
from ._checks import Layout, rows_contiguous

_SOURCE_CANDIDATES = (
    Path(__file__).resolve().parent.parent / "csrc" / "logprob.cpp",  # source checkout
    Path(__file__).resolve().parent / "csrc" / "logprob.cpp",  # installed package data
)
_state: dict = {}


def _source() -> Path:
    for path in _SOURCE_CANDIDATES:
        if path.exists():
            return path
    raise FileNotFoundError("csrc/logprob.cpp not found next to safedpo_kernels")


def _cpu_flags() -> list:
    """-O3, plus AVX2/FMA code paths only when the machine that builds (and runs) it has them."""
    flags = ["-O3", "-std=c++17"]
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    words = set(cpuinfo.split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= words:
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                  "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    elif {"avx2", "fma", "f16c"} <= words:
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


def build_dir() -> Path:
    """Cache directory of the build for this source, these flags and this torch version."""
    src = _source().read_bytes()
    key = hashlib.sha256(src + " ".join(_cpu_flags()).encode() + torch.__version__.encode()).hexdigest()[:16]
    root = Path(os.environ.get("SAFEDPO_CACHE_DIR", Path.home() / ".cache" / "safedpo_kernels"))
    return root / f"native-{key}"


def load(verbose: bool = False) -> bool:
    """Build (if needed) and load the extension; True on success. Records whether a build happened."""
    if "ok" in _state:
        return _state["ok"]
    from torch.utils import cpp_extension

    cache_limit = _cache_limit_bytes()  # a bad setting raises here, before anything is recorded
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / "safedpo_native.so"
    existed = library.exists()
    try:
        cpp_extension.load(
            name="safedpo_native",
            sources=[str(_source())],
            extra_cflags=_cpu_flags(),
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
        _state.update(ok=True, built=not existed, library=str(library))
    except Exception as exc:  # no compiler, no ninja, a failed build: fall back, loudly, once
        warnings.warn(
            f"safedpo_kernels: the native CPU kernels could not be built ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}); using backend 'torch'. "
            "Set SAFEDPO_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        _state.update(ok=False, built=False, error=exc)
    if _state["ok"]:
        torch.ops.safedpo_native.set_cache_limit(cache_limit)
    return _state["ok"]


def _cache_limit_bytes() -> int:
    mb = os.environ.get("SAFEDPO_CPU_GRAD_CACHE_MB")
    if mb is not None and mb.strip():
        try:
            return max(0, int(float(mb) * 2**20))
        except ValueError:
            raise ValueError(f"SAFEDPO_CPU_GRAD_CACHE_MB must be a number of MiB, got {mb!r}") from None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def grad_buffer(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor from the recycled buffers (or a new allocation)."""
    return torch.ops.safedpo_native.grad_buffer(list(shape), dtype)


def empty_cache() -> None:
    """Free every idle recycled gradient buffer (buffers still referenced by tensors are unaffected)."""
    if load():
        limit = cache_info()["limit_bytes"]
        torch.ops.safedpo_native.set_cache_limit(0)
        torch.ops.safedpo_native.set_cache_limit(limit)


def cache_info() -> dict:
    """Idle bytes and buffers kept, the byte limit, and how many requests were served from / missed it."""
    if not load():
        return {"idle_bytes": 0, "idle_buffers": 0, "limit_bytes": 0, "hits": 0, "misses": 0}
    idle, n, limit, hits, misses = torch.ops.safedpo_native.cache_info()
    return {"idle_bytes": idle, "idle_buffers": n, "limit_bytes": limit, "hits": hits, "misses": misses}


def available() -> bool:
    return load()


def build_info() -> dict:
    """{'ok': bool, 'built': whether this process compiled it, 'library': path} after load()."""
    load()
    return {k: v for k, v in _state.items() if k != "error"}


def logp_forward(logits: torch.Tensor, labels: torch.Tensor, layout: Layout, ignore_index: int):
    """Per-token log-probs (rows,) float32 (0 where ignored) and log-sum-exp (rows,) float32."""
    logits = rows_contiguous(logits)
    return torch.ops.safedpo_native.logp_forward(
        logits, labels.long().contiguous(), layout.seq_len, *layout.row_strides(logits), ignore_index
    )


def logp_backward(logits, labels, lse, g_tok, grad, layout: Layout, ignore_index: int) -> None:
    """Write g_tok * (onehot - softmax) into grad (same shape as logits; may be logits itself)."""
    src = rows_contiguous(logits)
    dst = rows_contiguous(grad)
    torch.ops.safedpo_native.logp_backward(
        src, dst, labels.long().contiguous(), lse.contiguous(), g_tok.contiguous(), layout.seq_len,
        *layout.row_strides(src), *layout.row_strides(dst),
    )
    if dst is not grad:
        grad.copy_(dst)


def _chunk_layout(rows: int) -> Layout:
    return Layout(n_seq=1, rows=rows, seq_len=rows, padded=False, cu_seqlens=None)


def _chunk_forward(z: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    return logp_forward(z, labels, _chunk_layout(z.shape[0]), ignore_index)


def _chunk_grad(z, labels, lse, g, ignore_index: int, overwrite: bool = True) -> torch.Tensor:
    layout = _chunk_layout(z.shape[0])
    dst = z if overwrite else torch.empty_like(z)
    logp_backward(z, labels, lse, g, dst, layout, ignore_index)
    return dst


# The fused-linear path: the torch backend's chunked matmuls, with these kernels on each logits chunk.
prepare_weight = torch_chunked.prepare_weight
dlogits_chunk_rows = torch_chunked.dlogits_chunk_rows


def linear_forward(hidden, weight, bias, labels, ignore_index: int):
    return torch_chunked.linear_forward(hidden, weight, bias, labels, ignore_index, chunk_fn=_chunk_forward)


def linear_dlogits(hidden, weight, bias, labels, lse, g, ignore_index: int) -> torch.Tensor:
    return torch_chunked.linear_dlogits(hidden, weight, bias, labels, lse, g, ignore_index, grad_fn=_chunk_grad)
