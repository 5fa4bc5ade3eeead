"""Large CPU buffers backed by transparent huge pages.

A fresh buffer of tens of MB (a chunk of logits, d weight) comes from mmap and is faulted in 4 KiB at a
time on its first write: on a 2-core x86 machine that is ~30 ms for 124 MB, a third as long as the matmul
that writes it. Asking the kernel for huge pages over the buffer before anything touches it
(madvise(MADV_HUGEPAGE): where /sys/kernel/mm/transparent_hugepage/enabled is "madvise", as on most
distributions) takes one fault per 2 MiB instead. Nothing is kept between calls: a buffer is freed as
any tensor is. Elsewhere (not Linux, not the CPU, small buffers, ``SAFEDPO_HUGEPAGES=0``) these are
torch.empty / torch.zeros.
"""

from __future__ import annotations

import ctypes
import sys
from functools import lru_cache

import torch

from ._env import env_flag

_MADV_HUGEPAGE = 14  # linux/mman.h, every architecture
_PAGE = 4096
_MIN_BYTES = 4 << 20  # below two huge pages there is little to gain


@lru_cache(maxsize=None)
def _madvise():
    if not sys.platform.startswith("linux") or not env_flag("SAFEDPO_HUGEPAGES", True):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def empty(shape, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """An uninitialized contiguous tensor of ``shape`` and ``dtype`` on ``device``; on a Linux CPU and from
    4 MiB up, its pages are asked to be huge pages before the first write (a refusal is harmless)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    advise = _madvise() if out.device.type == "cpu" and nbytes >= _MIN_BYTES else None
    if advise is not None:
        start = (out.data_ptr() + _PAGE - 1) & ~(_PAGE - 1)  # madvise takes whole pages inside the buffer
        end = (out.data_ptr() + nbytes) & ~(_PAGE - 1)
        advise(start, end - start, _MADV_HUGEPAGE)
    return out


def zeros(shape, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``empty`` filled with zeros."""
    return empty(shape, dtype, device).zero_()
