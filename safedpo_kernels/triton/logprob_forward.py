"""Forward kernel: per-token log-sum-exp and target log-prob, one pass over the vocabulary.

For each token row r (BLOCK_R rows per program), with z = logits[r, :] and y = labels[r]:

    lse[r] = log(sum_v exp(z_v))          online: running max m and running sum s, float32
    tok[r] = z_y - lse[r]                  0 where y == ignore_index, NaN where y is outside [0, V)

Memory traffic: each counted row's V logits are read once (ignored rows are not read at all); 8 bytes
per row are written. No (rows x V) intermediate exists; the per-sequence sum is an O(rows) reduction
done afterwards, in a fixed order.
"""

import triton
import triton.language as tl


@triton.jit
def logprob_forward_kernel(
    logits_ptr,
    labels_ptr,
    tok_ptr,
    lse_ptr,
    rows,
    V,
    seq_len,
    stride_seq,
    stride_tok,
    ignore_index,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
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
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(
            logits_ptr + row_off[:, None] + cols[None, :],
            mask=counted[:, None] & (cols[None, :] < V),
            other=float("-inf"),
        ).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # While everything seen is -inf (an ignored row, or -inf logits) shift by 0, not by -inf:
        # exp(-inf - (-inf)) would be NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        m = m_new
    # Ignored rows read nothing (s = 0); store lse = 0 for them rather than log(0).
    lse = tl.where(counted, m + tl.log(tl.where(counted, s, 1.0)), 0.0)

    target = tl.load(logits_ptr + row_off + label, mask=valid, other=0.0).to(tl.float32)
    tok = tl.where(valid, target - lse, float("nan"))
    tok = tl.where(counted, tok, 0.0)
    tl.store(tok_ptr + r, tok, mask=row_ok)
    tl.store(lse_ptr + r, lse, mask=row_ok)
