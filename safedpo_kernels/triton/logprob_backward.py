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
from ._utils import Launch, cast_for_store
from .logprob_forward import logprob_tiles


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

    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols[None, :] < V
        x = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=live[:, None] & col_ok, other=0.0)
        xf = x.to(tl.float32)
        p = tl.exp(xf - lse[:, None])
        onehot = (cols[None, :] == label[:, None]).to(tl.float32)
        d = g[:, None] * (onehot - p)
        if SOFTCAP:  # x = c * tanh(y / c): times dx/dy = 1 - (x / c)^2
            t = xf / softcap
            d = d * (1.0 - t * t)
        d = tl.where(live[:, None], d, 0.0)
        tl.store(
            grad_ptr + grad_off[:, None] + cols[None, :],
            cast_for_store(d, grad_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok,
        )


def backward_launch(logits, grad, labels, lse, g_tok, layout: Layout, softcap=None) -> Launch:
    """The launch that writes the gradient into ``grad`` (token rows contiguous; may be ``logits``, or a
    buffer of another dtype). Tiles as the forward's (``logprob_tiles``): the same row streamed once
    more, plus a store."""
    V = logits.shape[-1]
    block_r, block_v, num_warps = logprob_tiles(V, layout.rows)
    return Launch(
        logprob_backward_kernel,
        (triton.cdiv(layout.rows, block_r),),
        (logits, grad, labels, lse, g_tok, layout.rows, V, layout.seq_len,
         *layout.row_strides(logits), *layout.row_strides(grad), 1.0 if softcap is None else float(softcap)),
        dict(BLOCK_R=block_r, BLOCK_V=block_v, SOFTCAP=softcap is not None),
        num_warps,
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
