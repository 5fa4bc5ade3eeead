"""Pieces shared by the Triton kernels and their launchers: the online log-sum-exp step and the
description of one kernel launch, which the launchers run and ``bench.gpu_compile`` compiles for sm_80
and sm_90 without a GPU (so the compile check sees exactly the configurations the launchers choose).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl


@triton.jit
def online_lse_update(m, s, z):
    """Fold a (rows, cols) float32 tile ``z`` into each row's running max ``m`` and sum of exp ``s``.

    Returns the new (m, s) with s = sum exp(z - m) over everything seen so far. While everything seen
    is -inf (an ignored row, a masked vocabulary) the shift is 0, not -inf: exp(-inf - (-inf)) is NaN.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
    return m_new, s


@triton.jit
def online_stats_update(m, s, s1, zs, before, z, z_ok, before_label):
    """``online_lse_update`` that also carries what the token statistics need (torch_chunked.STATS): the
    running sum of exp(z - m) * z (rescaled with s), the sum of the valid logits (``z_ok``: the tile's
    columns inside the vocabulary) and the maximum over the columns before each row's label (the tile's
    ``before_label`` mask). A -inf logit adds 0 to the weighted sum, not exp(-inf) * -inf = NaN."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)
    e = tl.exp(z - shift[:, None])
    s = s * alpha + tl.sum(e, axis=1)
    s1 = s1 * alpha + tl.sum(e * tl.maximum(z, -3.4028234663852886e38), axis=1)
    zs += tl.sum(tl.where(z_ok, z, 0.0), axis=1)
    before = tl.maximum(before, tl.max(tl.where(before_label, z, float("-inf")), axis=1))
    return m_new, s, s1, zs, before


# Triton decides between compiling and interpreting when a kernel is defined (TRITON_INTERPRET=1).
INTERPRETED = type(online_lse_update).__name__ == "InterpretedFunction"
_EMULATE_RTNE = tl.constexpr(INTERPRETED)


@triton.jit
def cast_for_store(x, dtype: tl.constexpr):
    """float32 ``x`` in ``dtype``, rounded to nearest even, as compiled kernels round.

    The Triton interpreter's own float32 -> bfloat16 conversion truncates, which doubles the rounding
    error and biases it, so tests under TRITON_INTERPRET=1 would not see the numbers a GPU gives. There
    the rounding is done on the bits (NaN kept NaN); compiled kernels take the plain conversion.
    """
    if _EMULATE_RTNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(x == x, bits, 0x7FC00000)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=num_warps)``.

    ``args`` are the runtime arguments in the kernel's order (tensors, ints); ``constexprs`` the
    compile-time ones by name. Calling the object launches it.
    """

    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4

    def __call__(self) -> None:
        device = next((a.device for a in self.args if isinstance(a, torch.Tensor)), None)
        if device is None or device.type != "cuda":
            self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)
            return
        # Triton launches on the current CUDA device: on the tensors' own, so that a model on cuda:1 in a
        # process whose current device is cuda:0 runs there.
        with torch.cuda.device(device):
            self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)
