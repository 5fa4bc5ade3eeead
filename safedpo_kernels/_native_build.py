"""The build, cache and load machinery of the C++ CPU kernels of csrc/ (backend "native" is native.py).

The extension is compiled on first use with torch.utils.cpp_extension (ninja), into
``$SAFEDPO_CACHE_DIR`` (default ``~/.cache/safedpo_kernels``) under a name derived from the source,
the flags and the torch version: later processes load the cached library without building, and any
change to the source builds a fresh one. Without a compiler (or with a failed build) a one-time warning
is issued and "auto" falls back to backend "torch". ``SAFEDPO_NATIVE=0`` turns the backend off.

The library also keeps the recycled gradient buffers of native.py (``$SAFEDPO_CPU_GRAD_CACHE_MB``): their
limit is set when it is loaded, and ``empty_cache`` / ``cache_info`` are here with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
import warnings
from pathlib import Path

import torch

from ._env import cache_dir, cpu_grad_cache_bytes, env_choice

_SOURCE_CANDIDATES = (
    Path(__file__).resolve().parent.parent / "csrc" / "logprob.cpp",  # source checkout
    Path(__file__).resolve().parent / "csrc" / "logprob.cpp",  # installed package data
)
_state: dict = {}


def _source() -> Path:
    for path in _SOURCE_CANDIDATES:
        if path.exists():
            return path
    raise FileNotFoundError(f"csrc/logprob.cpp not found (looked in {', '.join(str(p.parent) for p in _SOURCE_CANDIDATES)})")


_ISA_FEATURES = {
    "avx512": ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX512",
                "-DCPU_CAPABILITY_AVX512"]),
    "avx2": ({"avx2", "fma", "f16c"}, ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]),
    "default": (set(), []),
}


def native_isa() -> str:
    """The instruction set the C++ kernels are built for: the best this machine has, or at most
    SAFEDPO_NATIVE_ISA (avx512 | avx2 | default), which makes a machine compute as a lesser one does
    (ValueError when the machine lacks it)."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        words = set()
    best = next(isa for isa, (needs, _) in _ISA_FEATURES.items() if needs <= words)
    asked = env_choice("SAFEDPO_NATIVE_ISA", "auto", ("auto", *_ISA_FEATURES))
    if asked == "auto":
        return best
    order = list(_ISA_FEATURES)
    if order.index(asked) < order.index(best):
        raise ValueError(f"SAFEDPO_NATIVE_ISA={asked}: this machine has no {asked} (its best is {best})")
    return asked


def _cpu_flags() -> list:
    """-O3, plus the AVX2/AVX-512 code paths of ``native_isa()``."""
    return ["-O3", "-std=c++17", *_ISA_FEATURES[native_isa()][1]]


def build_dir() -> Path:
    """Cache directory of the build for this source, these flags and this torch version and installation
    (FileNotFoundError when the source is missing). The source's and torch's paths are part of the key:
    they are in the build command, so two checkouts or two venvs sharing one directory would each have
    ninja rebuild the other's library on every switch (and under a process that has it loaded)."""
    path = _source()
    where = f"{path.resolve()}\0{Path(torch.__file__).resolve().parent}"
    key = hashlib.sha256(path.read_bytes() + " ".join(_cpu_flags()).encode() + torch.__version__.encode()
                         + where.encode()).hexdigest()[:16]
    return cache_dir() / f"native-{key}"


# What a usable build registers; a stale or foreign library that lacks one is not used.
_OPS = ("logp_forward", "logp_forward_stats", "logp_backward", "grad_buffer", "set_cache_limit", "cache_info")


LOCK_TIMEOUT_S = 1800.0


@contextlib.contextmanager
def _build_lock(directory: Path, timeout_s: float = LOCK_TIMEOUT_S):
    """Exclusive while building or loading: an flock on ``<directory>.lock``, which the OS releases when
    its holder dies, so a process killed mid-build never blocks the next one (torch's own lock file in
    the build directory, which such a process leaves behind, is removed under this lock)."""
    path = directory.with_name(directory.name + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = path.read_text().strip() or "unknown"
                    raise TimeoutError(f"waited {timeout_s:.0f} s for {path}, held by process {holder} that is "
                                       "still building the native kernels") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        (directory / "lock").unlink(missing_ok=True)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(verbose: bool):
    """Compile (when the cache has no current build) and load the library; (path, whether it was built).

    The cache is private (mode 0700), and the library's SHA-256 is recorded after each build or load:
    a library that does not match its record (changed since) is not loaded; one without a record (from
    before records were kept) is rebuilt."""
    from torch.utils import cpp_extension

    directory = build_dir()
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.mkdir(mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    library = directory / "safedpo_native.so"
    record = directory / "safedpo_native.so.sha256"
    with _build_lock(directory):
        if library.exists() and not record.exists():
            library.unlink()
        existed = library.exists()
        if existed and record.read_text().strip() != _sha256(library):
            raise RuntimeError(f"{library} does not match the SHA-256 recorded when it was built; not loading it "
                               f"(delete {directory} to rebuild)")
        cpp_extension.load(
            name="safedpo_native",
            sources=[str(_source())],
            extra_cflags=_cpu_flags(),
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
        # What is there now was verified above or (re)built just now (ninja relinks when, say, the source
        # path differs between two checkouts of the same source): record it.
        record.write_text(_sha256(library) + "\n")
    missing = [op for op in _OPS if not hasattr(torch.ops.safedpo_native, op)]
    if missing:
        raise RuntimeError(f"{library} does not provide {', '.join(missing)} (a stale or foreign build)")
    return library, not existed


def load(verbose: bool = False) -> bool:
    """Build (if needed) and load the extension; True on success. Records whether a build happened.

    Any failure -- no source (an installation without csrc/), no compiler or ninja, a failed build, a
    cached library that does not load or lacks a symbol -- warns once and returns False, so that "auto"
    falls back to backend "torch".
    """
    if "ok" in _state:
        return _state["ok"]
    cache_limit = cpu_grad_cache_bytes()  # a bad setting is the caller's error: it raises, it does not fall back
    native_isa()  # likewise
    try:
        library, built = _build(verbose)
        torch.ops.safedpo_native.set_cache_limit(cache_limit)
        _state.update(ok=True, built=built, library=str(library))
    except Exception as exc:
        text = str(exc).strip()
        warnings.warn(
            f"safedpo_kernels: the native CPU kernels are not available ({type(exc).__name__}: "
            f"{text.splitlines()[-1] if text else exc}); using backend 'torch'. Set SAFEDPO_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        _state.update(ok=False, built=False, error=exc)
    return _state["ok"]


def is_loaded() -> bool:
    """True when this process has loaded the extension (never builds it, unlike ``available``)."""
    return bool(_state.get("ok"))


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
