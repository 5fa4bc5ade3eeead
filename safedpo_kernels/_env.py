"""The SAFEDPO_* environment variables that tune the kernels, read and checked in one place, and the
one reader of true/false words (environment variables here, safety flags in data files elsewhere).

A malformed value is an error that names the variable, never a silent fallback: a typo in a tile size
must not turn into a wrong result or a division by zero deep inside a kernel launch.

Two memory budgets, each with one purpose (bytes, counted as float32 (rows x V) values):
    SAFEDPO_CHUNK_BYTES         the working set of the chunked PyTorch / C++ code: the torch backend's
                                temporaries over logits it is given (its forward takes at most 8 MiB of
                                it on the CPU, see torch_chunked.forward_chunk_rows), and the torch and
                                native backends' fused-linear chunks (forward, and the backward's
                                recomputed logits).
                                Default 32 MiB; 256 MiB on CUDA (a 32 MiB chunk of a 128k vocabulary is
                                65 rows, too few to fill a GPU).
    SAFEDPO_LINEAR_CHUNK_BYTES  the logits the fused-linear autograd Functions materialize at once: a
                                chunk of pairs of linear_safedpo_loss (its gradients are formed in the
                                forward, and each chunk also updates the whole d weight, so larger
                                chunks are faster), and the Triton backend's backward chunks. Default
                                512 MiB; 4 GiB on CUDA.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import torch

# Every SAFEDPO_* variable the package and its trainer read, with its default; docs/backends.md has the
# same table with what each means, and a test keeps the code, this table and that page in step.
VARIABLES = {
    "SAFEDPO_NATIVE": "1 (the C++ CPU backend on)",
    "SAFEDPO_NATIVE_ISA": "auto (the machine's best of AVX-512, AVX2, plain)",
    "SAFEDPO_CACHE_DIR": "~/.cache/safedpo_kernels",
    "SAFEDPO_CPU_GRAD_CACHE_MB": "a quarter of physical memory",
    "SAFEDPO_HUGEPAGES": "1 (large CPU buffers asked to be transparent huge pages)",
    "SAFEDPO_CHUNK_BYTES": "32 MiB; 256 MiB on CUDA",
    "SAFEDPO_LINEAR_CHUNK_BYTES": "512 MiB; 4 GiB on CUDA",
    "SAFEDPO_TRITON_BLOCK_V": "8192 (65536 interpreted)",
    "SAFEDPO_TRITON_TILE": "8192 (65536 interpreted)",
    "SAFEDPO_TRITON_NUM_WARPS": "from the tile: 4 to 16",
    "SAFEDPO_LINEAR_BLOCK_N": "128",
    "SAFEDPO_LINEAR_SPLITS": "enough programs to fill the GPU",
    "SAFEDPO_LINEAR_GEMM": "triton",
    # the trainer's (safedpo/): read there, listed here so that one table has them all
    "SAFEDPO_PROGRESS_EVERY_S": "30",
    "SAFEDPO_CPU_ISA": "native",
}


def major_minor(version: Optional[str] = None) -> tuple:
    """(major, minor) of a version string such as "2.11.0+cu130" or "2.4.0rc1" (default: the running
    torch's), for the few places that work around a dependency's version."""
    parts = ((version or torch.__version__).split("+")[0].split(".") + ["0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def setting(name: str) -> str:
    """Environment variable ``name`` without surrounding spaces ("" when unset): unset and empty mean
    the default for every reader here."""
    return os.environ.get(name, "").strip()


def float32_rows(budget_bytes: int, width: int) -> int:
    """Rows of a float32 (rows x width) buffer that fit in ``budget_bytes`` (at least 1): how every
    chunked path sizes its chunks from its budget."""
    return max(1, budget_bytes // (4 * width))


def env_int(name: str, default: int, *, minimum: int = 1, power_of_two: bool = False) -> int:
    """The integer value of environment variable ``name`` (``default`` when unset or empty).

    ValueError naming the variable when it is not an integer, is below ``minimum``, or (for tile sizes,
    which Triton's ``tl.arange`` needs as powers of two) is not a power of two.
    """
    text = setting(name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if power_of_two and value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


def env_number(name: str, default: float, *, minimum: float = 0.0) -> float:
    """The finite number >= ``minimum`` in environment variable ``name`` (``default`` when unset or
    empty); ValueError naming the variable for anything else."""
    text = setting(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= minimum):
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {text!r}")
    return value


def env_choice(name: str, default: str, choices: tuple) -> str:
    """The value of environment variable ``name`` (lower case), one of ``choices``; unset or empty gives
    ``default``; anything else is a ValueError naming the variable and the choices."""
    text = setting(name).lower()
    if not text:
        return default
    if text not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {os.environ[name]!r}")
    return text


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(value) -> Optional[bool]:
    """A boolean written as a bool, the number 1 or 0 (1.0 / 0.0 too), or one of the words TRUE_WORDS /
    FALSE_WORDS (any case, spaces around ignored); None for anything else (the caller names it)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
    return None


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment variable (see ``parse_bool``); unset or empty gives ``default``; anything
    else is a ValueError naming the variable."""
    text = setting(name)
    if not text:
        return default
    value = parse_bool(text)
    if value is None:
        raise ValueError(f"{name} must be one of {TRUE_WORDS + FALSE_WORDS}, got {os.environ[name]!r}")
    return value


def _on_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def chunk_bytes(device=None) -> int:
    """SAFEDPO_CHUNK_BYTES: the chunked PyTorch / C++ working set (see the module docstring)."""
    return env_int("SAFEDPO_CHUNK_BYTES", (256 << 20) if _on_cuda(device) else (32 << 20))


def linear_chunk_bytes(device=None) -> int:
    """SAFEDPO_LINEAR_CHUNK_BYTES: the fused-linear path's materialized logits (see the module docstring)."""
    return env_int("SAFEDPO_LINEAR_CHUNK_BYTES", (4 << 30) if _on_cuda(device) else (512 << 20))


def cache_dir() -> Path:
    """SAFEDPO_CACHE_DIR: where the C++ extension is built and cached."""
    text = setting("SAFEDPO_CACHE_DIR")
    return Path(text) if text else Path.home() / ".cache" / "safedpo_kernels"


def cpu_grad_cache_bytes() -> int:
    """SAFEDPO_CPU_GRAD_CACHE_MB: bytes of idle recycled CPU gradient buffers kept for reuse (0: none);
    default a quarter of physical memory."""
    if setting("SAFEDPO_CPU_GRAD_CACHE_MB"):
        return int(env_number("SAFEDPO_CPU_GRAD_CACHE_MB", 0.0) * 2**20)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def linear_splits() -> Optional[int]:
    """SAFEDPO_LINEAR_SPLITS: vocabulary slices per block of rows of the Triton fused-linear forward, or
    None (unset: the launcher fills the GPU)."""
    return env_int("SAFEDPO_LINEAR_SPLITS", 1) if setting("SAFEDPO_LINEAR_SPLITS") else None
