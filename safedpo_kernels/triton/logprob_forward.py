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
from ._utils import INTERPRETED, Launch, online_lse_update, online_stats_update


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
    STATS: tl.constexpr = False,
):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = r < rows
    # Row r lives at (r // T) * stride_seq + (r % T) * stride_tok: shifted views need no copy.
    row_off = (r // seq_len) * stride_seq + (r % seq_len) * stride_tok
    label = tl.load(labels_ptr + r, mask=row_ok, other=ignore_index).to(tl.int64)
    counted = row_ok & (label != ignore_index)
    valid = counted & (label >= 0) & (label < V)

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    if STATS:
        s1 = tl.zeros([BLOCK_R], tl.float32)
        zs = tl.zeros([BLOCK_R], tl.float32)
        before = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(
            logits_ptr + row_off[:, None] + cols[None, :],
            mask=counted[:, None] & (cols[None, :] < V),
            other=float("-inf"),
        ).to(tl.float32)
        if STATS:
            m, s, s1, zs, before = online_stats_update(m, s, s1, zs, before, x, cols[None, :] < V,
                                                       cols[None, :] < label[:, None])
        else:
            m, s = online_lse_update(m, s, x)
    # Ignored rows read nothing (s = 0); store lse = 0 for them rather than log(0).
    lse = tl.where(counted, m + tl.log(tl.where(counted, s, 1.0)), 0.0)

    target = tl.load(logits_ptr + row_off + label, mask=valid, other=0.0).to(tl.float32)
    tok = tl.where(valid, target - lse, float("nan"))
    tok = tl.where(counted, tok, 0.0)
    tl.store(tok_ptr + r, tok, mask=row_ok)
    tl.store(lse_ptr + r, lse, mask=row_ok)
    if STATS:
        out = stats_ptr + r * 5
        tl.store(out, tl.where(counted, s1 / tl.where(counted, s, 1.0), 0.0), mask=row_ok)
        tl.store(out + 1, tl.where(counted, zs, 0.0), mask=row_ok)
        tl.store(out + 2, tl.where(counted, m, 0.0), mask=row_ok)
        tl.store(out + 3, tl.where(counted, before, 0.0), mask=row_ok)
        tl.store(out + 4, target, mask=row_ok)


def logprob_tiles(V: int, rows: int):
    """(BLOCK_R, BLOCK_V, num_warps) of both logits-path kernels (forward and backward).

    Compiled default: BLOCK_V = 8192 vocabulary entries per step and 16 warps, i.e. one token row per
    program for any real vocabulary, 16 elements per thread and step (two 16-byte loads in bf16).
    Chosen from the compile report (bench/results/gpu-compile-*.md, ``python -m bench.gpu_compile``):
    no spills and at most 1.1 KiB of shared memory in any dtype; 31-32 registers, i.e. 4 resident
    blocks = 100% occupancy, except the forward on sm_80 (40 registers, 3 blocks, 75%). Even there
    1536 threads x 32 bytes = 48 KiB of bf16 loads are in flight per SM, several times the ~10 KiB an
    A100 SM needs to cover DRAM latency at full bandwidth (H100: ~15 KiB), so the kernels stream at
    the bandwidth limit. 4096 x 16 warps reaches 100% on sm_80 too but halves the bytes in flight per
    thread and doubles the loop steps (each with two block-wide reductions); 16384 x 16 warps needs
    48-64 registers (50% occupancy). Small vocabularies put several rows in a program (BLOCK_R), so
    that a tile stays about 8192 elements.

    The interpreter pays per block iteration, so it gets 65536-element tiles. Overrides (powers of two):
    SAFEDPO_TRITON_BLOCK_V, SAFEDPO_TRITON_TILE (elements per program and step; the tests use small
    values to cross block boundaries) and SAFEDPO_TRITON_NUM_WARPS.
    """
    default = 1 << 16 if INTERPRETED else 8192
    max_tile = env_int("SAFEDPO_TRITON_TILE", default, power_of_two=True)
    block_v = min(triton.next_power_of_2(V), env_int("SAFEDPO_TRITON_BLOCK_V", default, power_of_two=True), max_tile)
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), max_tile // block_v))
    num_warps = env_int("SAFEDPO_TRITON_NUM_WARPS", min(16, max(4, block_r * block_v // 512)), power_of_two=True)
    return block_r, block_v, num_warps


def forward_launch(logits, labels, tok, lse, layout: Layout, ignore_index: int, stats=None) -> Launch:
    """The launch that fills tok and lse (rows,) float32 from logits whose token rows are contiguous, and
    ``stats`` (rows, STATS) float32 when given."""
    V = logits.shape[-1]
    block_r, block_v, num_warps = logprob_tiles(V, layout.rows)
    return Launch(
        logprob_forward_kernel,
        (triton.cdiv(layout.rows, block_r),),
        (logits, labels, tok, lse, tok if stats is None else stats, layout.rows, V, layout.seq_len,
         *layout.row_strides(logits), ignore_index),
        dict(BLOCK_R=block_r, BLOCK_V=block_v, STATS=stats is not None),
        num_warps,
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
