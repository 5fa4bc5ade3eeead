"""Backward kernel: d loss / d logits = g[r] * (onehot(y) - softmax(z)), one pass over the vocabulary.

g[r] is the token's share of the sequence gradient (0 for ignored tokens, 1/count-scaled for averages),
lse[r] the forward's saved log-sum-exp, so softmax is recomputed as exp(z - lse) and nothing V-sized was
kept from the forward. Arithmetic is float32 (the true-class term 1 - p is formed in float32 before any
rounding); the result is stored in the gradient buffer's dtype. The gradient buffer may be the logits
themselves (in-place backward): every element is read, then written, by the same program.

Memory traffic: rows with g != 0 read V logits and write V gradients; rows with g == 0 (prompt, padding)
only write zeros.
"""

import triton
import triton.language as tl


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
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
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
        p = tl.exp(x.to(tl.float32) - lse[:, None])
        onehot = (cols[None, :] == label[:, None]).to(tl.float32)
        d = tl.where(live[:, None], g[:, None] * (onehot - p), 0.0)
        tl.store(
            grad_ptr + grad_off[:, None] + cols[None, :],
            d.to(grad_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok,
        )
