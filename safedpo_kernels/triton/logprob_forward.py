"""Forward kernel of the logits path: per-token log-sum-exp and target log-prob, one pass over V.

For each token row r (BLOCK_R rows per program), with z = logits[r, :] and y = labels[r]:

    lse[r] = log(sum_v exp(z_v))          online: running max m and running sum s, float32
    tok[r] = z_y - lse[r]                  0 where y == ignore_index, NaN where y is outside [0, V)

With STATS (token statistics asked for) the same pass also writes stats[r, :] (torch_chunked.STATS):
sum_v softmax(z)_v z_v, sum_v z_v, max_v z_v, the maximum over v < y, and z_y; without it the kernel is
compiled without any of that (a constexpr), so statistics cost nothing when they are off.

Memory traffic: each counted row's V logits are read once (ignored rows are not read at all); 8 bytes
per row are written. No (rows x V) intermediate exists; the per-sequence sum is an O(rows) reduction
done afterwards, in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import rows_contiguous
from .._env import env_int
from .._layout import Layout
from ..torch_chunked import STATS
from ._utils import INTERPRETED, LOG2E, Launch, before_label, exp2, lane_lse_update, lane_stats_update, lanes_lse


@triton.jit
def logprob_forward_kernel(
    logits_ptr,
    labels_ptr,
    tok_ptr,
    lse_ptr,
    stats_ptr,
    rows,
    V,
    seq_len,
    stride_seq,
    stride_tok,
    ignore_index,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    STATS: tl.constexpr,
    LANES: tl.constexpr,
    VEC: tl.constexpr,
):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = r < rows
    # Row r lives at (r // T) * stride_seq + (r % T) * stride_tok: shifted views need no copy.
    row_off = (r // seq_len) * stride_seq + (r % seq_len) * stride_tok
    label = tl.load(labels_ptr + r, mask=row_ok, other=ignore_index).to(tl.int64)
    counted = row_ok & (label != ignore_index)
    valid = counted & (label >= 0) & (label < V)

    # A tile is UNROLL x LANES vectors of VEC elements (16 bytes), lane k's being vectors k, k + LANES, ...:
    # one thread's. Each lane keeps its own running (max, sum) over the row's tiles, so the loop has no
    # cross-thread reduction, and the lanes meet once, after it. The full tiles run unmasked along the
    # vocabulary; the partial last one (or an empty one) is a masked step after the loop.
    UNROLL: tl.constexpr = BLOCK_V // (LANES * VEC)
    cols = ((tl.arange(0, UNROLL)[:, None, None] * LANES + tl.arange(0, LANES)[None, :, None]) * VEC
            + tl.arange(0, VEC)[None, None, :])
    ptrs = logits_ptr + row_off[:, None, None, None] + cols[None, :, :, :]
    rows_mask = counted[:, None, None, None]
    m = tl.full([BLOCK_R, LANES], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R, LANES], tl.float32)
    full = (V // BLOCK_V) * BLOCK_V
    if STATS:
        s1 = tl.zeros([BLOCK_R, LANES], tl.float32)
        zs = tl.zeros([BLOCK_R, LANES], tl.float32)
        before = tl.full([BLOCK_R, LANES], float("-inf"), tl.float32)
        if BLOCK_R == 1:
            # The full tiles before the label's tile, that tile, then the full tiles after it: the loops
            # compare no column with the label; only the one tile does.
            at = tl.minimum(tl.maximum(tl.max(label, axis=0), 0) // BLOCK_V * BLOCK_V, full)
            for v0 in range(0, at, BLOCK_V):
                x = tl.load(ptrs + v0, mask=rows_mask, other=float("-inf")).to(tl.float32)
                m, s, s1, zs, tile_max = lane_stats_update(m, s, s1, zs, x, x)
                before = tl.maximum(before, tile_max)
            if at < full:
                x = tl.load(ptrs + at, mask=rows_mask, other=float("-inf")).to(tl.float32)
                m, s, s1, zs, _ = lane_stats_update(m, s, s1, zs, x, x)
                before = before_label(before, x, at, cols, label)
            for v0 in range(at + BLOCK_V, full, BLOCK_V):
                x = tl.load(ptrs + v0, mask=rows_mask, other=float("-inf")).to(tl.float32)
                m, s, s1, zs, _ = lane_stats_update(m, s, s1, zs, x, x)
        else:  # several rows of a small vocabulary per program (or overridden tiles): compare in every tile
            for v0 in range(0, full, BLOCK_V):
                x = tl.load(ptrs + v0, mask=rows_mask, other=float("-inf")).to(tl.float32)
                m, s, s1, zs, _ = lane_stats_update(m, s, s1, zs, x, x)
                before = before_label(before, x, v0, cols, label)
    else:
        for v0 in range(0, full, BLOCK_V):
            x = tl.load(ptrs + v0, mask=rows_mask, other=float("-inf")).to(tl.float32)
            m, s = lane_lse_update(m, s, x, LOG2E)
    in_vocab = (full + cols)[None, :, :, :] < V
    x = tl.load(ptrs + full, mask=rows_mask & in_vocab, other=float("-inf")).to(tl.float32)
    if STATS:
        m, s, s1, zs, _ = lane_stats_update(m, s, s1, zs, x, tl.where(in_vocab, x, 0.0))
        before = before_label(before, x, full, cols, label)
    else:
        m, s = lane_lse_update(m, s, x, LOG2E)
    lse, top = lanes_lse(m, s)
    # Ignored rows read nothing (s = 0); store lse = 0 for them rather than log(0).
    lse = tl.where(counted, lse, 0.0)

    target = tl.load(logits_ptr + row_off + label, mask=valid, other=0.0).to(tl.float32)
    tok = tl.where(valid, target - lse, float("nan"))
    tok = tl.where(counted, tok, 0.0)
    tl.store(tok_ptr + r, tok, mask=row_ok)
    tl.store(lse_ptr + r, lse, mask=row_ok)
    if STATS:
        # Each lane's weighted sum is relative to its own maximum: 2^((lane max - lse) log2 e) rescales it.
        expected = tl.sum(s1 * exp2((m - lse[:, None]) * LOG2E), axis=1)
        out = stats_ptr + r * 5
        tl.store(out, tl.where(counted, expected, 0.0), mask=row_ok)
        tl.store(out + 1, tl.where(counted, tl.sum(zs, axis=1), 0.0), mask=row_ok)
        tl.store(out + 2, tl.where(counted, top, 0.0), mask=row_ok)
        tl.store(out + 3, tl.where(counted, tl.max(before, axis=1), 0.0), mask=row_ok)
        tl.store(out + 4, target, mask=row_ok)


def logprob_tiles(V: int, rows: int, elt_size: int = 2):
    """(BLOCK_R, BLOCK_V, num_warps) of both logits-path kernels (forward and backward), for logits of
    ``elt_size`` bytes.

    Compiled default: 16 KiB of logits per step and 16 warps -- BLOCK_V = 8192 bf16/fp16 or 4096 float32
    entries, one token row per program for any real vocabulary -- i.e. two 16-byte vectors per thread and
    step. The loops keep per-thread running (max, sum) and combine the threads once per row (see the
    kernels), so a step costs no block-wide reduction and short steps are cheap; 1536-2048 threads x 32
    bytes in flight per SM are several times the ~10 KiB an A100 SM needs to cover DRAM latency at full
    bandwidth (H100: ~15 KiB). Registers, spills and occupancy per target are in the compile report
    (bench/results/gpu-compile-*.md, ``python -m bench.gpu_compile``), with the issue model's prediction
    of each kernel's instructions against its memory time; ``register_limit`` keeps the occupancy.
    Small vocabularies put several rows in a program (BLOCK_R), so that a step stays about 16 KiB.

    The interpreter pays per block iteration, so it gets 65536-element tiles. Overrides (powers of two):
    SAFEDPO_TRITON_BLOCK_V, SAFEDPO_TRITON_TILE (elements per program and step; the tests use small
    values to cross block boundaries) and SAFEDPO_TRITON_NUM_WARPS.
    """
    default = 1 << 16 if INTERPRETED else 16384 // elt_size
    max_tile = env_int("SAFEDPO_TRITON_TILE", default, power_of_two=True)
    block_v = min(triton.next_power_of_2(V), env_int("SAFEDPO_TRITON_BLOCK_V", default, power_of_two=True), max_tile)
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), max_tile // block_v))
    warps = min(16, max(4, block_r * block_v * elt_size // 1024))
    num_warps = env_int("SAFEDPO_TRITON_NUM_WARPS", warps, power_of_two=True)
    return block_r, block_v, num_warps


def lanes(block_v: int, num_warps: int, elt_size: int) -> dict:
    """LANES and VEC of a tile of ``elt_size``-byte logits: 16-byte vectors (VEC elements), one lane per
    thread where the tile has enough vectors (a tile of 8192 elements and 16 warps: 16 elements per
    thread in 2 (bf16) or 4 (float32) vectors)."""
    vec = max(1, min(block_v, 16 // elt_size))
    return dict(LANES=max(1, min(block_v // vec, 32 * num_warps)), VEC=vec)


def register_limit(backward: bool, elt_size: int, stats: bool = False) -> dict:
    """Per compute capability, the register limit (Triton's maxnreg) a logits-path kernel is compiled
    with, where ptxas's own choice would lower the occupancy or spill: 32 registers per thread keep 4
    blocks of 16 warps (100 %) resident per SM. Chosen from the registers and spills of each launch
    compiled with and without a limit (bench.gpu_compile's matrix); everywhere else ptxas's own choice
    already fits (float32 tiles hold half the elements) or a limit would spill. ptxas alone spills a
    few bytes of the forward on sm_100 (float16) and of the forward with token statistics on sm_80: 64
    registers there. ``elt_size``: bytes per logit; for the backward, the smaller of the logits' and the
    gradient's (float32 logits with a 16-bit gradient fit the 16-bit limit)."""
    if elt_size == 4:
        return {}
    if stats:
        return {80: 64, 90: None}
    if backward:
        return {80: 32}
    return {90: 32, 100: 64}


def forward_launch(logits, labels, tok, lse, layout: Layout, ignore_index: int, stats=None) -> Launch:
    """The launch that fills tok and lse (rows,) float32 from logits whose token rows are contiguous, and
    ``stats`` (rows, STATS) float32 when given."""
    V = logits.shape[-1]
    block_r, block_v, num_warps = logprob_tiles(V, layout.rows, logits.element_size())
    return Launch(
        logprob_forward_kernel,
        (triton.cdiv(layout.rows, block_r),),
        (logits, labels, tok, lse, tok if stats is None else stats, layout.rows, V, layout.seq_len,
         *layout.row_strides(logits), ignore_index),
        dict(BLOCK_R=block_r, BLOCK_V=block_v, STATS=stats is not None, **lanes(block_v, num_warps, logits.element_size())),
        num_warps,
        register_limit(False, logits.element_size(), stats is not None),
    )


def logp_forward(logits: torch.Tensor, labels: torch.Tensor, layout: Layout, ignore_index: int, stats: bool = False):
    """Per-token log-probs (rows,) float32 (0 where ignored) and log-sum-exp (rows,) float32; with
    ``stats`` also the (rows, STATS) token statistics (torch_chunked.STATS)."""
    logits = rows_contiguous(logits)
    tok = torch.empty(layout.rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(tok)
    st = torch.empty(layout.rows, STATS, dtype=torch.float32, device=logits.device) if stats else None
    if layout.rows:
        forward_launch(logits, labels, tok, lse, layout, ignore_index, st)()
    return (tok, lse, st) if stats else (tok, lse)
