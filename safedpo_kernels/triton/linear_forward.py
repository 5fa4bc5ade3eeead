"""Fused-linear forward kernel: log-sum-exp and target logit of hidden @ weight.T + bias, on chip.

Program (i, j) takes BLOCK_M token rows and the j-th of SPLITS contiguous slices of the vocabulary. For
each BLOCK_N-wide vocabulary tile it forms the logits tile with tl.dot over H in BLOCK_K steps (float32
accumulation; IEEE precision for float32 inputs, so no TF32 rounding), then folds the tile into a running
(max, sum of exp) per row and picks the target logit where the label falls in the tile. It writes one
partial (max, sum, target) per row and slice; the slices are combined afterwards in a fixed order, so the
result is deterministic (no atomics). Logits never leave the chip.

Memory traffic: hidden rows are read once per vocabulary tile (from L2 in practice), the weight once per
row block; 12 bytes per row and slice are written.
"""

import triton
import triton.language as tl


@triton.jit
def linear_logits_tile(h_ptr, w_ptr, b_ptr, rows_idx, row_ok, cols, col_ok, H, stride_h, stride_w,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 tile of hidden[rows] @ weight[cols].T (+ bias[cols]).

    UPCAST is for the Triton interpreter only, whose tl.dot mishandles bf16 (stored as uint16) and
    accumulates fp16 in fp16; compiled kernels feed the tensor cores the input dtype directly.
    """
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_ptr + rows_idx[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def linear_forward_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, max_ptr, sum_ptr, tgt_ptr,
    rows, V, H, stride_h, stride_w, cols_per_split, SPLITS,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    split = tl.program_id(1)
    r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = r < rows
    label = tl.load(labels_ptr + r, mask=row_ok, other=-1).to(tl.int64)
    v_begin = split * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    tgt = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < v_end
        z = linear_logits_tile(h_ptr, w_ptr, b_ptr, r, row_ok, cols.to(tl.int64), col_ok, H, stride_h, stride_w,
                               HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        m = m_new
        tgt += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
    out = r * SPLITS + split
    tl.store(max_ptr + out, m, mask=row_ok)
    tl.store(sum_ptr + out, s, mask=row_ok)
    tl.store(tgt_ptr + out, tgt, mask=row_ok)
