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
_INTERPRETED = tl.constexpr(INTERPRETED)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def exp2(x):
    """2^x as one MUFU.EX2 instruction (ex2.approx.ftz: a result below 2^-126 is 0, far below what a
    softmax term or its gradient can matter by). tl.exp and tl.exp2 wrap the instruction in a rescale
    for denormal results: four more instructions per element in a loop that streams at the bandwidth.
    The interpreter runs NumPy's exp2 (inline PTX is the compiler's)."""
    if _INTERPRETED:
        return tl.exp2(x)
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def lane_max(x):
    """(rows, LANES) maxima of a (rows, UNROLL, LANES, VEC) tile: over a lane's own elements."""
    return tl.max(tl.max(x, axis=3), axis=1)


@triton.jit
def lane_sum(x):
    """(rows, LANES) sums of a (rows, UNROLL, LANES, VEC) tile, over a lane's own elements."""
    return tl.sum(tl.sum(x, axis=3), axis=1)


@triton.jit
def lane_lse_update(m, s, x, c):
    """Fold a (rows, UNROLL, LANES, VEC) float32 tile ``x`` into each lane's running max ``m`` and sum
    ``s`` of 2^((x - max) c) -- (rows, LANES) each. A lane is one thread's UNROLL vectors of VEC elements
    (16 bytes each, LANES threads apart: loads stay coalesced): nothing crosses threads inside the loop,
    and the lanes are combined once, after it (``lanes_lse``). ``c`` is log2(e) for a tile in natural
    units."""
    m_new = tl.maximum(m, lane_max(x))
    # While everything seen is -inf (an ignored row) the shift is 0, not -inf: -inf - -inf is NaN.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new * c)
    s = s * exp2(m * c - shift) + lane_sum(exp2(x * c - shift[:, None, :, None]))
    return m_new, s


@triton.jit
def lane_stats_update(m, s, s1, zs, x, x_sum):
    """``lane_lse_update`` (natural units) carrying what the token statistics need, per lane: the sum of
    2^((x - max) log2 e) * x (rescaled with s), and the sum of ``x_sum`` (the tile's logits, 0 where
    masked). A -inf logit adds 0 to the weighted sum, not 2^-inf * -inf = NaN. Also returns the tile's
    lane maxima."""
    tile_max = lane_max(x)
    m_new = tl.maximum(m, tile_max)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new * LOG2E)
    alpha = exp2(m * LOG2E - shift)
    e = exp2(x * LOG2E - shift[:, None, :, None])
    s = s * alpha + lane_sum(e)
    s1 = s1 * alpha + lane_sum(e * tl.maximum(x, -3.4028234663852886e38))
    zs += lane_sum(x_sum)
    return m_new, s, s1, zs, tile_max


@triton.jit
def before_label(before, x, v0, cols, label):
    """Each lane's maximum over the columns before its row's label, after tile ``x`` (columns v0 + cols):
    an element-wise comparison, for the tile that holds the label."""
    masked = tl.where((v0 + cols)[None, :, :, :] < label[:, None, None, None], x, float("-inf"))
    return tl.maximum(before, lane_max(masked))


@triton.jit
def lanes_lse(m, s):
    """(rows,) log-sum-exp of the lanes' (max, sum) pairs, natural units, and the rows' maximum."""
    top = tl.max(m, axis=1)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(s * exp2((m - shift[:, None]) * LOG2E), axis=1)
    return shift + tl.log(total), top


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
    compile-time ones by name. ``max_registers`` maps a compute capability (80, 90, 100, ...) to the
    register limit per thread the kernel is compiled with there (Triton's maxnreg; none where absent):
    the launcher's choice, from the compile report, for the occupancy it wants. Calling the object
    launches it.
    """

    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    max_registers: dict = field(default_factory=dict)

    def registers_for(self, cap: int):
        """The register limit on a device of compute capability ``cap`` (the highest listed at or below
        it), or None."""
        listed = [c for c in self.max_registers if c <= cap]
        return self.max_registers[max(listed)] if listed else None

    def __call__(self) -> None:
        device = next((a.device for a in self.args if isinstance(a, torch.Tensor)), None)
        if device is None or device.type != "cuda":
            self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)
            return
        major, minor = torch.cuda.get_device_capability(device)
        limit = self.registers_for(10 * major + minor)
        options = {} if limit is None else dict(maxnreg=limit)
        # Triton launches on the current CUDA device: on the tensors' own, so that a model on cuda:1 in a
        # process whose current device is cuda:0 runs there.
        with torch.cuda.device(device):
            self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, **options)
