"""Backward kernel of the logits path: d loss / d logits = g[r] * (onehot(y) - softmax(z)), one pass.

g[r] is the token's share of the sequence gradient (0 for ignored tokens, 1/count-scaled for averages),
lse[r] the forward's saved log-sum-exp, so softmax is recomputed as exp(z - lse) and nothing V-sized was
kept from the forward. Arithmetic is float32 (the true-class term 1 - p is formed in float32 before any
rounding); the result is stored in the gradient buffer's dtype. The gradient buffer may be the logits
themselves (in-place backward): every element is read, then written, by the same program.

With SOFTCAP the logits are soft-capped values x = c * tanh(y / c) (the fused-linear path of Gemma
2/3-style models) and each gradient is also multiplied by dx/dy = 1 - (x / c)^2.

Memory traffic: rows with g != 0 read V logits and write V gradients; rows with g == 0 (prompt, padding)
only write zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._checks import rows_contiguous
from .._layout import Layout
from ._utils import LOG2E, Launch, cast_for_store, exp2
from .logprob_forward import lanes, logprob_tiles, register_limit


@triton.jit
def softmax_grad(x, neg_g, shift, inv_cap, SOFTCAP: tl.constexpr):
    """-g * softmax for a (rows, UNROLL, LANES, VEC) float32 tile: one FFMA and one MUFU per element
    (``shift`` = lse log2 e per row, +inf for a row that gets zeros), times 1 - (x / c)^2 with SOFTCAP."""
    d = exp2(x * LOG2E - shift[:, None, None, None]) * neg_g[:, None, None, None]
    if SOFTCAP:  # x = c * tanh(y / c): times dx/dy = 1 - (x / c)^2
        t = x * inv_cap
        d = d * (1.0 - t * t)
    return d


@triton.jit
def logprob_backward_kernel(
    logits_ptr,
    grad_ptr,
    labels_ptr,
    lse_ptr,
    g_ptr,
    rows,
    V,
    seq_len,
    stride_seq,
    stride_tok,
    grad_stride_seq,
    grad_stride_tok,
    softcap,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SOFTCAP: tl.constexpr,
    LANES: tl.constexpr,
    VEC: tl.constexpr,
):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = r < rows
    seq, tok = r // seq_len, r % seq_len
    row_off = seq * stride_seq + tok * stride_tok
    grad_off = seq * grad_stride_seq + tok * grad_stride_tok
    g = tl.load(g_ptr + r, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + r, mask=row_ok, other=0.0)
    # An out-of-range label (validate=False) matches no column: no out-of-bounds access.
    label = tl.load(labels_ptr + r, mask=row_ok, other=-1).to(tl.int64)
    live = row_ok & (g != 0.0)
    has_target = live & (label >= 0) & (label < V)
    # A row that gets zeros reads nothing: its shift is +inf, so that softmax is 0 for it (not exp(-lse),
    # which can overflow), and -g is +0.0, not -0.0.
    shift = tl.where(live, lse * LOG2E, float("inf"))
    neg_g = 0.0 - g
    inv_cap = 1.0 / softcap

    # The true-class term g * (1 - p), formed in float32 from the target logit read before the loop (which
    # may overwrite it, in place), is stored after the loop: the loop itself compares no column.
    x_t = tl.load(logits_ptr + row_off + label, mask=has_target, other=0.0).to(tl.float32)
    p_t = exp2(x_t * LOG2E - shift)
    d_t = g * (1.0 - p_t)
    if SOFTCAP:
        t_t = x_t * inv_cap
        d_t = d_t * (1.0 - t_t * t_t)

    # The forward's tiles (logprob_forward.py): full tiles unmasked along the vocabulary, the partial last
    # one after the loop; a thread reads, then writes, its own vectors.
    UNROLL: tl.constexpr = BLOCK_V // (LANES * VEC)
    cols = ((tl.arange(0, UNROLL)[:, None, None] * LANES + tl.arange(0, LANES)[None, :, None]) * VEC
            + tl.arange(0, VEC)[None, None, :])
    src = logits_ptr + row_off[:, None, None, None] + cols[None, :, :, :]
    dst = grad_ptr + grad_off[:, None, None, None] + cols[None, :, :, :]
    read = live[:, None, None, None]
    write = row_ok[:, None, None, None]
    full = (V // BLOCK_V) * BLOCK_V
    for v0 in range(0, full, BLOCK_V):
        x = tl.load(src + v0, mask=read, other=0.0).to(tl.float32)
        d = softmax_grad(x, neg_g, shift, inv_cap, SOFTCAP)
        tl.store(dst + v0, cast_for_store(d, grad_ptr.dtype.element_ty), mask=write)
    in_vocab = (full + cols)[None, :, :, :] < V
    x = tl.load(src + full, mask=read & in_vocab, other=0.0).to(tl.float32)
    d = softmax_grad(x, neg_g, shift, inv_cap, SOFTCAP)
    tl.store(dst + full, cast_for_store(d, grad_ptr.dtype.element_ty), mask=write & in_vocab)
    # Every thread's stores of the row are done (and visible) before the target's is written over them.
    tl.debug_barrier()
    tl.store(grad_ptr + grad_off + label, cast_for_store(d_t, grad_ptr.dtype.element_ty), mask=has_target)


def backward_launch(logits, grad, labels, lse, g_tok, layout: Layout, softcap=None) -> Launch:
    """The launch that writes the gradient into ``grad`` (token rows contiguous; may be ``logits``, or a
    buffer of another dtype). Tiles as the forward's (``logprob_tiles``): the same row streamed once
    more, plus a store."""
    V = logits.shape[-1]
    block_r, block_v, num_warps = logprob_tiles(V, layout.rows, logits.element_size())
    return Launch(
        logprob_backward_kernel,
        (triton.cdiv(layout.rows, block_r),),
        (logits, grad, labels, lse, g_tok, layout.rows, V, layout.seq_len,
         *layout.row_strides(logits), *layout.row_strides(grad), 1.0 if softcap is None else float(softcap)),
        dict(BLOCK_R=block_r, BLOCK_V=block_v, SOFTCAP=softcap is not None, **lanes(block_v, num_warps, logits.element_size())),
        num_warps,
        # float32 logits with a 16-bit gradient (the fused-linear loss's chunks) fit the 16-bit limit;
        # a float32 gradient as well would spill under it on sm_80.
        register_limit(True, min(logits.element_size(), grad.element_size())),
    )


def logp_backward(logits, labels, lse, g_tok, grad, layout: Layout, ignore_index: int, softcap=None) -> None:
    """Write g_tok * (onehot - softmax) into grad (logits' shape; may be logits itself), times the
    softcap derivative 1 - (logits / softcap)^2 when ``softcap`` is set."""
    if layout.rows == 0:
        return
    src = rows_contiguous(logits)
    # In place on logits that needed a copy: the copy is both source and destination.
    dst = src if grad is logits else rows_contiguous(grad)
    backward_launch(src, dst, labels, lse, g_tok, layout, softcap)()
    if dst is not grad:
        grad.copy_(dst)
