"""The autograd Functions behind the public entry points, and the O(tokens) reductions they share.

Deliberately plain ``torch.autograd.Function``s (no torch.func transforms), which keeps them DDP- and
checkpoint-friendly. Each forward asks a backend (see ``dispatch.Backend``) for per-token log-probs and
log-sum-exps, reduces them per sequence in a fixed order and saves only O(tokens) values; each backward
turns the sequences' d loss / d logp into d loss / d logits through the same backend.
"""

from __future__ import annotations

import torch

from ._checks import Layout
from .dispatch import backend_module


def segment_sums(tok: torch.Tensor, counted: torch.Tensor, layout: Layout):
    """Per-sequence sums of per-token values (float64 accumulation, fixed order) and token counts."""
    if layout.padded:
        N, T = layout.n_seq, layout.seq_len
        return tok.view(N, T).sum(1, dtype=torch.float64), counted.view(N, T).sum(1)
    cu = layout.cu_seqlens
    zero = tok.new_zeros(1, dtype=torch.float64)
    # A float64 prefix sum (a deterministic scan) differenced at the boundaries: no atomics.
    csum = torch.cat([zero, tok.double().cumsum(0)])
    ccount = torch.cat([zero.long(), counted.long().cumsum(0)])
    return csum[cu[1:]] - csum[cu[:-1]], ccount[cu[1:]] - ccount[cu[:-1]]


def sequence_values(tok: torch.Tensor, counted: torch.Tensor, layout: Layout, average: bool):
    """(N,) float32 sequence log-probs (sums, or means over counted tokens) and the (N,) token counts."""
    seq, count = segment_sums(tok, counted, layout)
    if average:
        seq = seq / count.clamp(min=1)
    return seq.to(torch.float32), count


def token_grads(grad_seq: torch.Tensor, counted: torch.Tensor, count: torch.Tensor, layout: Layout, average: bool):
    """Spread each sequence's d loss / d logp over its counted tokens: (rows,) float32."""
    g = grad_seq.to(torch.float64)
    if average:
        g = g / count.clamp(min=1)
    g = g.to(torch.float32)
    if layout.padded:
        g_tok = g.repeat_interleave(layout.seq_len)
    else:
        lengths = layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]
        g_tok = g.repeat_interleave(lengths, output_size=layout.rows)
    return torch.where(counted, g_tok, torch.zeros_like(g_tok))


class SequenceLogpsFunction(torch.autograd.Function):
    """logits (N, T, V) | (total, V) -> per-sequence log-probs (N,) float32; see ``sequence_logps``.

    Saves the logits (a reference, no copy), the labels and one float32 log-sum-exp per token; backward
    writes g * (onehot - softmax) into a backend buffer, or into the logits themselves when ``inplace``.
    """

    @staticmethod
    def forward(ctx, logits, labels, layout: Layout, ignore_index: int, average: bool, inplace: bool, backend: str):
        impl = backend_module(backend)
        tok, lse = impl.logp_forward(logits, labels, layout, ignore_index)
        seq, count = sequence_values(tok, labels != ignore_index, layout, average)
        ctx.save_for_backward(logits, labels, lse, count)
        ctx.meta = (layout, ignore_index, average, inplace, impl)
        return seq

    @staticmethod
    def backward(ctx, grad_seq):
        logits, labels, lse, count = ctx.saved_tensors
        layout, ignore_index, average, inplace, impl = ctx.meta
        g_tok = token_grads(grad_seq, labels != ignore_index, count, layout, average)
        grad = logits if inplace else impl.grad_buffer(logits.shape, logits.dtype, logits.device)
        impl.logp_backward(logits, labels, lse, g_tok, grad, layout, ignore_index)
        return grad, None, None, None, None, None, None


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b, without a temporary when a and b are float32 already."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


class LinearSequenceLogpsFunction(torch.autograd.Function):
    """hidden (N, T, H) | (total, H), weight (V, H), bias (V,) -> (N,) float32 sequence log-probs.

    Only the counted (response) tokens are computed at all: their hidden rows are gathered first (an
    O(tokens x H) copy), so prompt and padding tokens cost nothing. Forward keeps one float32
    log-sum-exp per counted token; backward recomputes the logits chunk by chunk, turns each chunk into
    d logits, and takes d hidden = d logits @ weight and d weight += d logits.T @ hidden with matmuls,
    d weight accumulated in float32 over the chunks in a fixed order.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, layout: Layout, ignore_index: int, average: bool, backend: str):
        impl = backend_module(backend)
        counted = labels != ignore_index
        idx = counted.nonzero().squeeze(1)
        h = hidden.reshape(layout.rows, hidden.shape[-1]).index_select(0, idx)
        lab = labels.index_select(0, idx)
        w, b = impl.prepare_weight(weight, bias, hidden.dtype)
        tok_c, lse = impl.linear_forward(h, w, b, lab, ignore_index)
        tok = torch.zeros(layout.rows, dtype=torch.float32, device=hidden.device).index_copy_(0, idx, tok_c)
        seq, count = sequence_values(tok, counted, layout, average)
        ctx.save_for_backward(hidden, weight, bias, labels, idx, lse, count)
        ctx.meta = (layout, ignore_index, average, impl)
        return seq

    @staticmethod
    def backward(ctx, grad_seq):
        hidden, weight, bias, labels, idx, lse, count = ctx.saved_tensors
        layout, ignore_index, average, impl = ctx.meta
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        counted = labels != ignore_index
        g = token_grads(grad_seq, counted, count, layout, average).index_select(0, idx)
        H = hidden.shape[-1]
        h = hidden.reshape(layout.rows, H).index_select(0, idx)
        lab = labels.index_select(0, idx)
        w, b = impl.prepare_weight(weight, bias, hidden.dtype)
        V = weight.shape[0]
        dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        dw = torch.zeros(V, H, dtype=torch.float32, device=h.device) if need_w else None
        db = torch.zeros(V, dtype=torch.float32, device=h.device) if need_b else None
        chunk = impl.dlogits_chunk_rows(V, hidden.dtype)
        for r0 in range(0, h.shape[0], chunk):
            r1 = min(r0 + chunk, h.shape[0])
            dz = impl.linear_dlogits(h[r0:r1], w, b, lab[r0:r1], lse[r0:r1], g[r0:r1], ignore_index)
            if need_h:
                dh[r0:r1] = dz @ w
            if need_w:
                _accumulate_product(dw, dz.t(), h[r0:r1].to(dz.dtype))
            if need_b:
                db += dz.sum(dim=0, dtype=torch.float32)
            del dz
        grad_hidden = None
        if need_h:
            grad_hidden = torch.zeros(layout.rows, H, dtype=hidden.dtype, device=h.device)
            grad_hidden = grad_hidden.index_copy_(0, idx, dh.to(hidden.dtype)).view(hidden.shape)
        return (
            grad_hidden,
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
            None, None, None, None, None,
        )
