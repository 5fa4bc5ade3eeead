"""The autograd Functions behind the public entry points, and the O(tokens) reductions they share.

Deliberately plain ``torch.autograd.Function``s (no torch.func transforms), which keeps them DDP- and
checkpoint-friendly. Each forward asks a backend (see ``dispatch.Backend``) for per-token log-probs and
log-sum-exps, reduces them per sequence in a fixed order and saves only O(tokens) values; each backward
turns the sequences' d loss / d logp into d loss / d logits through the same backend.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Optional

import torch

from ._env import linear_chunk_bytes
from ._layout import Layout
from .dispatch import backend_module
from .loss import loss_from_logps, safety_transform
from .options import LossOptions


def first_order_only(backward):
    """The kernels' backward passes are first-order: under create_graph=True (a second derivative on the
    way) raise a clear error at once, rather than return gradients without a graph."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "safedpo_kernels computes first-order gradients only: backward with create_graph=True (for second "
                "derivatives) is not supported"
            )
        return backward(ctx, *grads)

    return wrapper


def autocast_off(method):
    """Run a forward or backward with autocast switched off. The kernels take their inputs in the
    dtypes they come in and choose their own precision (float32 logits and accumulation); under an
    ambient autocast (a trainer's bf16 mixed precision) the chunked matmuls of the CPU backends would
    otherwise produce bfloat16 logits, which moves a log-prob by ~|z| / 256 per token."""

    @functools.wraps(method)
    def wrapper(ctx, *args):
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda"):
                if _autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return method(ctx, *args)

    return wrapper


def _autocast_enabled(device: str) -> bool:
    try:
        return torch.is_autocast_enabled(device)
    except TypeError:  # torch without the device_type argument
        return torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()


def autocast_operands(*tensors):
    """Inside torch.autocast, the LM head's matmul operands (hidden, weight, bias) in autocast's dtype,
    as autocast would hand them to F.linear -- differentiably, so a float32 weight still gets a float32
    gradient; outside it, or for a device autocast does not cover, the tensors unchanged. The kernels
    then keep the logits in float32, where autocast would have rounded them."""
    device = tensors[0].device.type
    if device not in ("cpu", "cuda") or not _autocast_enabled(device):
        return tensors
    try:
        dtype = torch.get_autocast_dtype(device)
    except AttributeError:  # older torch
        dtype = torch.get_autocast_cpu_dtype() if device == "cpu" else torch.get_autocast_gpu_dtype()
    return tuple(t if t is None or t.dtype in (dtype, torch.float64) else t.to(dtype) for t in tensors)


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
    @autocast_off
    def forward(ctx, logits, labels, layout: Layout, ignore_index: int, average: bool, inplace: bool, backend: str):
        impl = backend_module(backend)
        tok, lse = impl.logp_forward(logits, labels, layout, ignore_index)
        seq, count = sequence_values(tok, labels != ignore_index, layout, average)
        ctx.save_for_backward(logits, labels, lse, count)
        ctx.meta = (layout, ignore_index, average, inplace, impl)
        return seq

    @staticmethod
    @first_order_only
    @autocast_off
    def backward(ctx, grad_seq):
        logits, labels, lse, count = ctx.saved_tensors
        layout, ignore_index, average, inplace, impl = ctx.meta
        g_tok = token_grads(grad_seq, labels != ignore_index, count, layout, average)
        if not inplace:
            grad = impl.grad_buffer(logits.shape, logits.dtype, logits.device)
            impl.logp_backward(logits, labels, lse, g_tok, grad, layout, ignore_index)
            return grad, None, None, None, None, None, None
        impl.logp_backward(logits, labels, lse, g_tok, logits, layout, ignore_index)
        # The logits now hold their gradient: a second backward through this graph (retain_graph) must
        # fail autograd's saved-tensor check instead of reading gradients as logits.
        torch.autograd.graph.increment_version(logits)
        # A new tensor over the same memory that needs no grad: AccumulateGrad can take it as a leaf's
        # .grad without a copy (it copies a returned tensor that requires grad, e.g. the leaf itself).
        return logits.detach(), None, None, None, None, None, None


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b, without a temporary when a and b are float32 already."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


class _Grads:
    """The fused-linear gradients being formed: d hidden rows (float32 or the matmul dtype), d weight and
    d bias accumulated in float32 in a fixed order (chunk after chunk: deterministic)."""

    def __init__(self, rows: int, V: int, H: int, hidden, need_h: bool, need_w: bool, need_b: bool):
        device = hidden.device
        self.hidden = torch.zeros(rows, H, dtype=hidden.dtype, device=device) if need_h else None
        self.weight = torch.zeros(V, H, dtype=torch.float32, device=device) if need_w else None
        self.bias = torch.zeros(V, dtype=torch.float32, device=device) if need_b else None

    def add(self, dz: torch.Tensor, h: torch.Tensor, w: torch.Tensor, rows: torch.Tensor) -> None:
        """Fold d loss / d logits ``dz`` of the rows ``rows`` (whose hidden states are ``h``) in:
        d hidden[rows] = dz @ w, d weight += dz.T @ h, d bias += the column sums of dz."""
        if self.hidden is not None:
            self.hidden.index_copy_(0, rows, (dz @ w).to(self.hidden.dtype))
        if self.weight is not None:
            _accumulate_product(self.weight, dz.t(), h.to(dz.dtype))
        if self.bias is not None:
            self.bias += dz.sum(dim=0, dtype=torch.float32)

    def recompute(self, impl, h, w, b, lab, lse, g, rows, ignore_index, logit_scale, softcap) -> None:
        """The gradients of rows whose logits were not kept: recomputed a chunk of rows at a time."""
        chunk = impl.dlogits_chunk_rows(w.shape[0], h.dtype, h.device)
        for r0 in range(0, h.shape[0], chunk):
            r1 = min(r0 + chunk, h.shape[0])
            dz = impl.linear_dlogits(h[r0:r1], w, b, lab[r0:r1], lse[r0:r1], g[r0:r1], ignore_index, logit_scale, softcap)
            self.add(dz, h[r0:r1], w, rows[r0:r1])
            del dz

    def results(self, specs, scale=None) -> tuple:
        """(d hidden, d weight, d bias) in their inputs' (shape, dtype) ``specs``, times ``scale`` if given."""
        def out(g, spec):
            if g is None:
                return None
            if scale is not None:
                g = g.mul_(scale.to(g.dtype))
            return g.to(spec[1]).view(spec[0])
        return tuple(out(g, spec) for g, spec in zip((self.hidden, self.weight, self.bias), specs))


def _specs(*tensors) -> tuple:
    return tuple(None if t is None else (t.shape, t.dtype) for t in tensors)


class LinearSequenceLogpsFunction(torch.autograd.Function):
    """hidden (N, T, H) | (total, H), weight (V, H), bias (V,) -> (N,) float32 sequence log-probs.

    Only the counted (response) tokens are computed at all: their hidden rows are gathered first (an
    O(tokens x H) copy), so prompt and padding tokens cost nothing. Forward keeps one float32
    log-sum-exp per counted token; backward recomputes the logits chunk by chunk (the upstream gradient
    is unknown in forward), turns each chunk into d logits, and takes d hidden = d logits @ weight and
    d weight += d logits.T @ hidden with matmuls, d weight accumulated in float32 in a fixed order.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, bias, labels, layout: Layout, average: bool, head: "LinearHead", backend: str):
        impl = backend_module(backend)
        counted = labels != head.ignore_index
        idx = counted.nonzero().squeeze(1)
        h = hidden.reshape(layout.rows, hidden.shape[-1]).index_select(0, idx)
        lab = labels.index_select(0, idx)
        w, b = impl.prepare_weight(weight, bias, hidden.dtype)
        tok_c, lse = impl.linear_forward(h, w, b, lab, head.ignore_index, head.logit_scale, head.softcap)
        tok = torch.zeros(layout.rows, dtype=torch.float32, device=hidden.device).index_copy_(0, idx, tok_c)
        seq, count = sequence_values(tok, counted, layout, average)
        ctx.save_for_backward(hidden, weight, bias, labels, idx, lse, count)
        ctx.meta = (layout, average, head, impl)
        return seq

    @staticmethod
    @first_order_only
    @autocast_off
    def backward(ctx, grad_seq):
        hidden, weight, bias, labels, idx, lse, count = ctx.saved_tensors
        layout, average, head, impl = ctx.meta
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        H = hidden.shape[-1]
        g = token_grads(grad_seq, labels != head.ignore_index, count, layout, average).index_select(0, idx)
        h = hidden.reshape(layout.rows, H).index_select(0, idx)
        w, b = impl.prepare_weight(weight, bias, hidden.dtype)
        grads = _Grads(layout.rows, weight.shape[0], H, hidden, need_h, need_w, need_b)
        grads.recompute(impl, h, w, b, labels.index_select(0, idx), lse, g, idx, head.ignore_index, head.logit_scale,
                        head.softcap)
        return (*grads.results(_specs(hidden, weight, bias)), None, None, None, None, None)


def _sequence_ids(layout: Layout, device) -> torch.Tensor:
    """(rows,) int64: the sequence each token row belongs to."""
    if layout.padded:
        return torch.arange(layout.rows, device=device) // layout.seq_len
    lengths = layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]
    return torch.arange(layout.n_seq, device=device).repeat_interleave(lengths, output_size=layout.rows)


def _pair_runs(rows_per_pair: list, budget_rows: int) -> list:
    """Consecutive runs of pairs [p0, p1) whose counted rows fit in ``budget_rows``; a pair that alone
    exceeds it is a run of its own (computed in two passes)."""
    runs, p0, used = [], 0, 0
    for p, n in enumerate(rows_per_pair):
        if p > p0 and used + n > budget_rows:
            runs.append((p0, p))
            p0, used = p, 0
        used += n
    runs.append((p0, len(rows_per_pair)))
    return runs


class PairChunk(NamedTuple):
    """One chunk of pairs [p0, p1) of linear_safedpo_loss: the counted token rows of its 2P sequences
    (chosen p0..p1-1, then rejected B+p0..B+p1-1, each sequence one run, in row order), their layout as
    2P packed sequences, and which of the (2B,) sequences they are."""

    p0: int
    p1: int
    rows: torch.Tensor
    layout: Layout
    sequences: torch.Tensor


def plan_pair_chunks(labels: torch.Tensor, layout: Layout, ignore_index: int, budget_rows: int) -> list:
    """Split the pairs into chunks of at most ``budget_rows`` counted tokens (a pair larger than that is
    a chunk alone). Reads the per-pair token counts on the host (one sync): the chunk sizes are Python
    ints that size the chunks' buffers."""
    device = labels.device
    B = layout.n_seq // 2
    idx = (labels != ignore_index).nonzero().squeeze(1)
    seq = _sequence_ids(layout, device).index_select(0, idx)
    pair = seq % B
    runs = _pair_runs(torch.bincount(pair, minlength=B).tolist(), budget_rows)
    run_of_pair = torch.repeat_interleave(torch.arange(len(runs), device=device),
                                          torch.tensor([p1 - p0 for p0, p1 in runs], device=device))
    run_of_tok = run_of_pair.index_select(0, pair)
    # A stable sort by chunk keeps row order inside each: the chosen sequences' runs, then the rejected'.
    order = torch.argsort(run_of_tok, stable=True)
    idx, seq = idx.index_select(0, order), seq.index_select(0, order)
    ends = torch.bincount(run_of_tok, minlength=len(runs)).cumsum(0).tolist()
    chunks, start = [], 0
    for (p0, p1), end in zip(runs, ends):
        s_c = seq[start:end]
        P = p1 - p0
        local = torch.where(s_c < B, s_c - p0, s_c - B - p0 + P)  # 0..2P-1, non-decreasing
        cu = torch.cat([local.new_zeros(1), torch.bincount(local, minlength=2 * P).cumsum(0)])
        sequences = torch.cat([torch.arange(p0, p1, device=device), torch.arange(B + p0, B + p1, device=device)])
        chunks.append(PairChunk(p0, p1, idx[start:end], Layout.packed(cu, end - start), sequences))
        start = end
    return chunks


def loss_chunk_rows(V: int, device: torch.device) -> int:
    """Token rows per chunk of pairs in linear_safedpo_loss: float32 logits within
    SAFEDPO_LINEAR_CHUNK_BYTES (see _env.py)."""
    return max(1, linear_chunk_bytes(device) // (4 * V))


class LinearHead(NamedTuple):
    """How the labels and the LM head's output are read: ignore_index, and the logit transform
    z = softcap * tanh(logit_scale * z0 / softcap) (or logit_scale * z0 without softcap)."""

    ignore_index: int
    logit_scale: float
    softcap: Optional[float]


class LinearSafeDPOLossFunction(torch.autograd.Function):
    """The SafeDPO loss from hidden states and the LM head, with its gradients formed in the forward.

    A pair's loss depends only on that pair's two log-probs (and its reference log-probs and flags),
    and the number of kept pairs is known from the flags before anything is computed. So the pairs are
    processed in chunks (chosen row i with rejected row B + i): the chunk's logits (one matmul), its
    log-probs, its loss and d loss / d log-prob, d loss / d logits in place, then d hidden = dz @ W and
    d weight += dz.T @ h (two more matmuls), and the chunk is freed: 3 matmuls over the tokens instead of
    the 4 of a design that recomputes the logits in backward. Backward only scales the stored gradients
    by the upstream gradient (a scalar). Gradients are formed only for the inputs that need them, and
    under torch.no_grad not at all. A pair whose logits alone exceed the chunk budget is computed in two
    passes (log-probs, then recomputed gradients), which keeps memory bounded at any sequence length.

    Returns (loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, kept, swapped), the
    last six without gradient.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, bias, labels, ref_logps, chosen_safe, rejected_safe, layout: Layout,
                options: LossOptions, head: LinearHead, backend: str, wants: tuple):
        impl = backend_module(backend)
        device, V = hidden.device, weight.shape[0]
        B = layout.n_seq // 2
        w, b = impl.prepare_weight(weight, bias, hidden.dtype)
        flat = hidden.reshape(layout.rows, hidden.shape[-1])
        grads = _Grads(layout.rows, V, hidden.shape[-1], hidden, *wants) if any(wants) else None
        kept = safety_transform(chosen_safe, rejected_safe, options).kept
        norm = max(int(kept.sum()), 1) if options.reduction == "mean" else 1
        ref = torch.zeros(2 * B, dtype=torch.float32, device=device) if ref_logps is None else ref_logps.detach().float()
        per_chunk = options.replace(reduction="sum")
        budget = loss_chunk_rows(V, device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        metrics = []
        for chunk in plan_pair_chunks(labels, layout, head.ignore_index, budget):
            out = _chunk_loss(impl, chunk, flat, w, b, labels, ref, chosen_safe, rejected_safe, per_chunk, head,
                                 budget, norm, grads)
            total += out.loss.detach().double()
            metrics.append(out[1:])
        loss = (total / norm).float()
        chosen, rejected, chosen_rewards, rejected_rewards, kept_out, swapped = (torch.cat(m) for m in zip(*metrics))
        ctx.grads = grads
        ctx.specs = _specs(hidden, weight, bias)
        ctx.mark_non_differentiable(chosen, rejected, chosen_rewards, rejected_rewards, kept_out, swapped)
        return loss, chosen, rejected, chosen_rewards, rejected_rewards, kept_out, swapped

    @staticmethod
    @first_order_only
    @autocast_off
    def backward(ctx, grad_loss, *unused):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "linear_safedpo_loss: its gradients were formed in the forward and consumed by the first backward; "
                "a second backward through the same graph (retain_graph=True) is not supported"
            )
        ctx.grads = None
        scale = None if bool(grad_loss == 1) else grad_loss
        return (*grads.results(ctx.specs, scale), None, None, None, None, None, None, None, None, None)


def _chunk_loss(impl, chunk: PairChunk, flat, w, b, labels, ref, chosen_safe, rejected_safe, options: LossOptions,
                head: LinearHead, budget: int, norm: int, grads):
    """One chunk of pairs: its logits, log-probs and loss (summed over its kept pairs), and, when
    ``grads`` is given, its gradients folded in (scaled by 1 / norm)."""
    h = flat.index_select(0, chunk.rows)
    lab = labels.index_select(0, chunk.rows)
    rows = chunk.rows.numel()
    flat_layout = Layout.single(rows)
    two_pass = rows > budget
    if two_pass:
        tok, lse = impl.linear_forward(h, w, b, lab, head.ignore_index, head.logit_scale, head.softcap)
    else:
        z = impl.linear_logits(h, w, b, head.logit_scale, head.softcap)
        tok, lse = impl.logp_forward(z, lab, flat_layout, head.ignore_index)
    every = torch.ones(rows, dtype=torch.bool, device=h.device)  # the chunk holds counted tokens only
    logps, count = sequence_values(tok, every, chunk.layout, options.average)
    leaf = logps.requires_grad_(grads is not None)
    with torch.enable_grad():
        out = loss_from_logps(leaf, ref.index_select(0, chunk.sequences), chosen_safe[chunk.p0:chunk.p1],
                              rejected_safe[chunk.p0:chunk.p1], options)
    if grads is None or rows == 0:
        return out
    (dlogp,) = torch.autograd.grad(out.loss, leaf)
    g = token_grads(dlogp.double() / norm, every, count, chunk.layout, options.average)
    if two_pass:
        grads.recompute(impl, h, w, b, lab, lse, g, chunk.rows, head.ignore_index, head.logit_scale, head.softcap)
        return out
    # d loss / d z0 = scale * d loss / d z (times the softcap derivative, which the kernel applies).
    dz = z if w.dtype == z.dtype else torch.empty(z.shape, dtype=w.dtype, device=z.device)
    impl.logp_backward(z, lab, lse, g * head.logit_scale, dz, flat_layout, head.ignore_index, head.softcap)
    grads.add(dz, h.to(w.dtype), w, chunk.rows)
    return out
