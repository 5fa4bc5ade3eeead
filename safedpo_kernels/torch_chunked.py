"""Portable, memory-lean PyTorch path (backend "torch").

Token rows are processed in chunks, so at most one chunk of float32 (rows x V) temporaries exists at a
time; backward recomputes the softmax from the saved per-token log-sum-exp instead of keeping it. Works
on any device PyTorch supports. The chunk size comes from a byte budget (``SAFEDPO_CHUNK_BYTES``, see
_env.py: 32 MiB of float32 per temporary, 256 MiB on CUDA).

On CUDA the fused-linear matmuls of bf16/fp16 operands run on the tensor cores with float32
accumulation and a float32 result (``torch.mm(..., out_dtype=torch.float32)``): the logits are as
exact as a float32 matmul's, at the half-precision rate. Elsewhere the operands are promoted to float32.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from . import _pages
from ._env import chunk_bytes, float32_rows
from ._layout import Layout

_HALF = (torch.bfloat16, torch.float16)
# torch.mm(a, b, out_dtype=torch.float32) for half operands: CUDA only, torch >= 2.8.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def chunk_rows_for(vocab: int, device=None) -> int:
    """Rows per chunk such that one float32 (rows x vocab) temporary stays within SAFEDPO_CHUNK_BYTES."""
    return float32_rows(chunk_bytes(device), vocab)


# The forward over given logits reads each chunk again after its maximum (and, with token statistics,
# twice more): on the CPU those re-reads hit the last-level cache only while a chunk is about this size.
# 8 x 1024 x 32000 float32 on a 2-core EPYC with 32 MiB of L3: 128 ms at 8 MiB against 137 ms at 32 MiB
# without statistics, 162 against 195 ms with them.
_CPU_FORWARD_CHUNK_BYTES = 8 << 20


def forward_chunk_rows(vocab: int, device) -> int:
    """Rows per chunk of the logits path's forward: SAFEDPO_CHUNK_BYTES, on the CPU at most 8 MiB."""
    budget = chunk_bytes(device)
    if torch.device(device).type == "cpu":
        budget = min(budget, _CPU_FORWARD_CHUNK_BYTES)
    return float32_rows(budget, vocab)


def _flat(x: torch.Tensor, layout: Layout):
    """(rows, last_dim) view of x's memory, or None where that needs a copy (e.g. ``logits[:, :-1]``)."""
    if not layout.padded:
        return x
    try:
        return x.view(layout.rows, x.shape[-1])
    except RuntimeError:
        return None


def row_chunks(layout: Layout, chunk: int, *tensors: torch.Tensor) -> Iterator[Tuple[int, int, list]]:
    """Yield (r0, r1, views): for each tensor, a (r1 - r0, last_dim) view of rows [r0, r1), never a copy.

    When any tensor cannot be flattened, chunks stop at sequence boundaries and index (n, t) instead.
    """
    flats = [_flat(x, layout) for x in tensors]
    if all(f is not None for f in flats):
        for r0 in range(0, layout.rows, chunk):
            r1 = min(r0 + chunk, layout.rows)
            yield r0, r1, [f[r0:r1] for f in flats]
        return
    T = layout.seq_len
    for n in range(layout.n_seq):
        for t0 in range(0, T, chunk):
            t1 = min(t0 + chunk, T)
            yield n * T + t0, n * T + t1, [x[n, t0:t1] for x in tensors]


def _target_mask(labels: torch.Tensor, vocab: int, ignore_index: int):
    counted = labels != ignore_index
    # validate=False may let an out-of-range label through: it reads nothing and yields NaN.
    valid = counted & (labels >= 0) & (labels < vocab)
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    return counted, valid, safe


def token_logps_from_chunk(x: torch.Tensor, labels: torch.Tensor, ignore_index: int, stats: bool = False,
                           work: Optional[torch.Tensor] = None):
    """(rows, V) float32 logits chunk -> (token log-prob with 0 at ignored tokens, lse), both (rows,), and
    with ``stats`` the (rows, STATS) float32 token statistics (see STATS).

    ``work``: a (rows, V) float32 scratch for exp(x - max), if the caller keeps one across chunks (a
    fresh chunk-sized allocation is page-faulted in on every call). The statistics reuse that
    exponential, so they cost a product and two row sums over the chunk (re-read from the cache while the
    chunk is cache-sized, see forward_chunk_rows), and never change the log-probs."""
    V = x.shape[-1]
    counted, valid, safe = _target_mask(labels, V, ignore_index)
    target = x.gather(1, safe.unsqueeze(1)).squeeze(1) if V else torch.zeros_like(labels, dtype=torch.float32)
    top = x.amax(-1) if V else torch.full(labels.shape, float("-inf"), device=x.device)
    # While a row is all -inf (a masked vocabulary) the shift is 0, not -inf: -inf - -inf is NaN.
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    e = torch.sub(x, shift.unsqueeze(1), out=work).exp_()
    s = e.sum(-1)
    lse = shift + torch.log(s)
    # A +inf logit makes log-softmax NaN (inf - inf), as in the reference and the other backends.
    lse = torch.where(lse == float("inf"), torch.full_like(lse, float("nan")), lse)
    tok = torch.where(valid, target - lse, torch.full_like(lse, float("nan")))
    tok = torch.where(counted, tok, torch.zeros_like(tok))
    if not stats:
        return tok, lse
    # Column 4 where the label is a column here; other counted rows (a shard's out-of-range label) get 0.
    columns = [x.sum(-1), top, _max_before_label(x, labels, target, top), torch.where(valid, target, torch.zeros_like(target))]
    # sum_v p_v x_v = sum_v e_v x_v / s. A -inf logit has e = 0, and 0 * -inf is NaN: nansum leaves it out;
    # a row whose sum is 0 or NaN (all -inf, or a NaN / +inf logit) gets 0.
    expected = torch.nansum(e.mul_(x), dim=-1) / s
    expected = torch.where(s > 0, expected, torch.zeros_like(expected))
    out = torch.stack([expected, *columns], dim=1)
    return tok, lse, torch.where(counted.unsqueeze(1), out, torch.zeros_like(out))


# The per-token statistics a forward kernel returns when asked (columns of a (rows, STATS) float32 tensor),
# all over this call's vocabulary (a shard's, with a vocab_group; reductions.py combines them):
#   0  sum_v softmax(z)_v z_v, with this call's own log-sum-exp (the entropy is lse - this)
#   1  sum_v z_v                  (the mean logit is this / V)
#   2  max_v z_v
#   3  max of z_v over the columns before the label's (v < label; -inf when there are none); a backend
#      may give the row's maximum instead where z_label is below it (the label is not top-1 either way)
#   4  z_label                    (0 when the label is not a column here)
# The label is top-1 when z_label >= max and z_label > the maximum before it: the lowest index of the
# maximum, as TRL counts it. Ignored rows are all 0.
STATS = 5


def _max_before_label(x: torch.Tensor, labels: torch.Tensor, target: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Column 3 of STATS: each row's maximum over the columns before its label (all of them for a label
    past V, as a vocabulary shard before the label's sees it)."""
    V = x.shape[-1]
    if x.device.type != "cpu":
        after = torch.arange(V, device=x.device)[None, :] >= labels.unsqueeze(1)
        return x.masked_fill(after, float("-inf")).amax(-1)
    # Only a label that reaches its row's maximum can be top-1, and only then does the maximum before it
    # matter: a slice of each such row, up to its label (nothing allocated). Elsewhere the row's maximum
    # (every column is before a label past V; a label below the maximum is not top-1 either way), and
    # -inf where no column is before the label (0, or below this shard). Few ops: this runs per chunk.
    out = torch.where(labels > 0, top, torch.full_like(top, float("-inf")))
    candidates = ((labels > 0) & (labels < V) & (target >= top)).nonzero().flatten().tolist()
    if candidates:
        ends = labels.tolist()
        for r in candidates:
            out[r] = x[r, : ends[r]].amax()
    return out


def grad_from_chunk(x, labels, lse, g, ignore_index: int, overwrite: bool = False, softcap=None) -> torch.Tensor:
    """g * (onehot(label) - softmax(x)) for a (rows, V) float32 chunk; rows with g == 0 get exact zeros.

    ``overwrite=True`` computes in x's own memory (x must be a temporary of the caller's). ``softcap``:
    x are soft-capped logits c * tanh(y / c), and the result is multiplied by their derivative
    d x / d y = 1 - (x / c)^2, i.e. it is the gradient with respect to y.
    """
    _, valid, safe = _target_mask(labels, x.shape[-1], ignore_index)
    factor = None if softcap is None else (x / softcap).square_().neg_().add_(1.0)
    grad = x.sub_(lse.unsqueeze(1)) if overwrite else torch.sub(x, lse.unsqueeze(1))
    grad = grad.exp_().mul_(-g.unsqueeze(1))
    grad.scatter_add_(1, safe.unsqueeze(1), torch.where(valid, g, torch.zeros_like(g)).unsqueeze(1))
    if factor is not None:
        grad.mul_(factor)
    # Ignored tokens (g == 0) may hold NaN/inf logits that must not leak into their gradient.
    return grad.masked_fill_((g == 0).unsqueeze(1), 0.0)


def logp_forward(logits: torch.Tensor, labels: torch.Tensor, layout: Layout, ignore_index: int, stats: bool = False):
    """Per-token log-probs (rows,) float32 (0 where ignored) and log-sum-exp (rows,) float32; with
    ``stats`` also the (rows, STATS) token statistics."""
    tok = torch.empty(layout.rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(tok)
    st = torch.empty(layout.rows, STATS, dtype=torch.float32, device=logits.device) if stats else None
    chunk = forward_chunk_rows(logits.shape[-1], logits.device)
    work = _pages.empty((min(chunk, layout.rows), logits.shape[-1]), torch.float32, logits.device)
    for r0, r1, (view,) in row_chunks(layout, chunk, logits):
        out = token_logps_from_chunk(view.float(), labels[r0:r1], ignore_index, stats, work[: r1 - r0])
        tok[r0:r1], lse[r0:r1] = out[0], out[1]
        if stats:
            st[r0:r1] = out[2]
    return (tok, lse, st) if stats else (tok, lse)


def grad_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The backward's output buffer. On the CPU a fresh buffer is faulted in page by page on first
    write; a (parallel) zero-fill first, of huge pages, is markedly cheaper than taking those faults
    inside the kernel."""
    if torch.device(device).type == "cpu":
        return _pages.zeros(shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device)


def logp_backward(logits, labels, lse, g_tok, grad, layout: Layout, ignore_index: int, softcap=None) -> None:
    """Write g_tok * (onehot - softmax) into grad (logits' shape; may be logits itself), times the
    softcap derivative 1 - (logits / softcap)^2 when ``softcap`` is set."""
    chunk = chunk_rows_for(logits.shape[-1], device=logits.device)
    for r0, r1, (src, dst) in row_chunks(layout, chunk, logits, grad):
        x = src.float()
        dst.copy_(grad_from_chunk(x, labels[r0:r1], lse[r0:r1], g_tok[r0:r1], ignore_index, overwrite=x is not src,
                                  softcap=softcap))


# ---- fused-linear path: logits = hidden @ weight.T + bias, one chunk of rows at a time ----


def half_matmul(device, dtype: torch.dtype) -> bool:
    """True where bf16/fp16 operands multiply on the tensor cores into a float32 result (CUDA)."""
    return _MM_OUT_DTYPE and torch.device(device).type == "cuda" and dtype in _HALF


def prepare_weight(weight: torch.Tensor, bias, hidden_dtype: torch.dtype):
    """The operands of the chunked matmuls: on CUDA, half-precision hidden states keep a weight in their
    dtype (tensor cores, float32 results); otherwise a float32 weight (one float32 copy of a bf16/fp16
    weight). The bias is float32, added to the float32 logits."""
    b = None if bias is None else bias.float()
    if half_matmul(weight.device, hidden_dtype):
        return (weight if weight.dtype == hidden_dtype else weight.to(hidden_dtype)), b
    return weight.float(), b


def matmul_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as a float32 tensor: half operands on CUDA accumulate and return in float32 on the tensor
    cores; anything else is multiplied in float32."""
    if a.dtype == b.dtype and half_matmul(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def transform_(z: torch.Tensor, logit_scale: float, softcap) -> torch.Tensor:
    """In place: z <- softcap * tanh(logit_scale * z / softcap), or logit_scale * z without a softcap."""
    if softcap is not None:
        return z.mul_(logit_scale / softcap).tanh_().mul_(softcap)
    return z.mul_(logit_scale) if logit_scale != 1.0 else z


def linear_logits(hidden: torch.Tensor, weight, bias, logit_scale: float = 1.0, softcap=None) -> torch.Tensor:
    """The float32 (rows, V) logits of one chunk of rows, transformed (weight/bias from prepare_weight)."""
    if weight.dtype == torch.float32:
        z = _pages.empty((hidden.shape[0], weight.shape[0]), torch.float32, hidden.device)
        if bias is None:
            torch.mm(hidden.float(), weight.t(), out=z)
        else:
            torch.addmm(bias, hidden.float(), weight.t(), out=z)
    else:
        z = matmul_float32(hidden.to(weight.dtype), weight.t())
        if bias is not None:
            z += bias
    return transform_(z, logit_scale, softcap)


def linear_forward(hidden: torch.Tensor, weight, bias, labels: torch.Tensor, ignore_index: int,
                   logit_scale: float = 1.0, softcap=None, stats: bool = False, chunk_fn=token_logps_from_chunk):
    """hidden (rows, H) -> per-token log-probs and log-sum-exps (rows,) float32, chunked over rows, and
    with ``stats`` the (rows, STATS) token statistics of the transformed logits.

    ``chunk_fn(z, labels, ignore_index, stats)`` reduces one float32 logits chunk (the native backend
    passes its C++ kernel).
    """
    rows = hidden.shape[0]
    tok = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(tok)
    st = torch.empty(rows, STATS, dtype=torch.float32, device=hidden.device) if stats else None
    chunk = chunk_rows_for(weight.shape[0], device=hidden.device)
    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        z = linear_logits(hidden[r0:r1], weight, bias, logit_scale, softcap)
        out = chunk_fn(z, labels[r0:r1], ignore_index, stats)
        tok[r0:r1], lse[r0:r1] = out[0], out[1]
        if stats:
            st[r0:r1] = out[2]
    return (tok, lse, st) if stats else (tok, lse)


def linear_dlogits(hidden, weight, bias, labels, lse, g, ignore_index: int, logit_scale: float = 1.0, softcap=None,
                   grad_fn=grad_from_chunk) -> torch.Tensor:
    """d loss / d (hidden @ weight.T + bias), (rows, V) in the weight's dtype (the gradient matmuls'),
    for one chunk of rows, logits recomputed; through the transform (its scale and softcap derivative)."""
    z = linear_logits(hidden, weight, bias, logit_scale, softcap)
    dz = grad_fn(z, labels, lse, g * logit_scale, ignore_index, overwrite=True, softcap=softcap)
    return dz if dz.dtype == weight.dtype else dz.to(weight.dtype)


def dlogits_chunk_rows(V: int, dtype: torch.dtype, device=None) -> int:
    """Rows per backward chunk: one float32 (rows x V) buffer within the chunk budget."""
    return chunk_rows_for(V, device=device)
