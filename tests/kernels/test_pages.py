"""_pages: large CPU buffers asked to be transparent huge pages; the same tensors as torch.empty/zeros
otherwise, and nothing when SAFEDPO_HUGEPAGES=0."""

import sys
from pathlib import Path

import pytest
import torch

from safedpo_kernels import _pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vm_flags(address: int) -> set:
    """The VmFlags of the mapping holding ``address`` in /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_buffers_are_what_torch_would_give(dtype):
    for shape in [(3, 5), (300, 7001)]:
        e = _pages.empty(shape, dtype)
        z = _pages.zeros(shape, dtype)
        assert e.shape == z.shape == shape and e.dtype == z.dtype == dtype and e.is_contiguous()
        assert e.device.type == z.device.type == "cpu"
        assert torch.count_nonzero(z).item() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
                    reason="transparent huge pages are Linux's, and off here")
def test_a_large_buffer_is_advised_huge_pages():
    big = _pages.empty((16 << 20) // 4)
    assert "hg" in _vm_flags(big.data_ptr() + (8 << 20))


def test_only_large_buffers_are_advised_and_only_inside_them(monkeypatch):
    calls = []
    monkeypatch.setattr(_pages, "_madvise", lambda: lambda start, length, advice: calls.append((start, length, advice)))
    small = _pages.empty((1000, 1000))  # 4 MB, under two huge pages
    assert calls == [] and small.shape == (1000, 1000)
    big = _pages.zeros((3000, 1001))
    ((start, length, advice),) = calls
    assert advice == 14 and start % 4096 == 0 and length % 4096 == 0
    assert big.data_ptr() <= start and start + length <= big.data_ptr() + big.numel() * 4
    assert length >= big.numel() * 4 - 8192  # every whole page of the buffer
    assert torch.count_nonzero(big).item() == 0


def test_turned_off_nothing_is_advised(monkeypatch):
    monkeypatch.setenv("SAFEDPO_HUGEPAGES", "0")
    _pages._madvise.cache_clear()
    try:
        assert _pages._madvise() is None
        assert _pages.empty((4 << 20,)).numel() == 4 << 20
    finally:
        monkeypatch.delenv("SAFEDPO_HUGEPAGES")
        _pages._madvise.cache_clear()
    assert (_pages._madvise() is not None) == sys.platform.startswith("linux")
