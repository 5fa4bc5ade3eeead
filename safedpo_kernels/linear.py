"""Fused-linear entry points: sequence log-probs and SafeDPO from hidden states and the LM head.

logits = hidden @ weight.T + bias are never materialized as a (tokens x V) tensor. Only the counted
(response) tokens are computed at all: their hidden rows are gathered first (an O(tokens x H) copy), so
prompt and padding tokens cost nothing. Forward keeps O(tokens) statistics (log-sum-exp); backward
recomputes the logits chunk by chunk, turns each chunk into d logits, and takes
d hidden = d logits @ weight and d weight += d logits.T @ hidden with matmuls, d weight accumulated in
float32 over the chunks in a fixed order.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import Layout, flat_labels, check_linear_weight, check_logits_and_labels, check_pair_inputs
from ._loss import check_loss_hparams, loss_from_logps
from .api import LossOptions, backend_module, resolve_backend, segment_sums, token_grads
from .reference import SafeDPOOutput


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b, without a temporary when a and b are float32 already."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


class LinearSequenceLogps(torch.autograd.Function):
    """hidden (N, T, H) | (total, H), weight (V, H), bias (V,) -> (N,) float32 sequence log-probs."""

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
        seq, count = segment_sums(tok, counted, layout)
        if average:
            seq = seq / count.clamp(min=1)
        ctx.save_for_backward(hidden, weight, bias, labels, idx, lse, count)
        ctx.meta = (layout, ignore_index, average, impl)
        return seq.to(torch.float32)

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


def _prepare(hidden, weight, labels, bias, cu_seqlens, ignore_index, validate, backend):
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    V = check_linear_weight(hidden, weight, bias)
    layout = check_logits_and_labels(hidden, labels, cu_seqlens, ignore_index, validate, logits_name="hidden", vocab=V)
    return layout, flat_labels(labels), resolve_backend(backend, hidden.device)


def linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    average: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    inplace_backward: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """``sequence_logps`` of logits = hidden @ weight.T + bias, without ever materializing the logits.

    Args:
        hidden: (N, T, H) padded or (total_tokens, H) packed last hidden states; float32/bfloat16/float16.
        weight: (V, H) LM head weight (tied or not; frozen is fine). A dtype other than hidden's is cast
            once for the kernels; its gradient comes back in its own dtype.
        labels: (N, T) or (total_tokens,) int32/int64 token ids aligned with hidden, ``ignore_index`` for
            prompt/padding tokens (those cost nothing: only counted tokens are computed).
        bias: optional (V,) LM head bias.
        ignore_index, average, cu_seqlens, backend, validate: as in ``sequence_logps``.
        inplace_backward: accepted for symmetry with ``sequence_logps``; it has nothing to do here, since
            no logits exist to overwrite.

    Returns:
        (N,) float32, differentiable w.r.t. hidden, weight and bias. Under torch.no_grad() this is the
        intended way to compute ref_logps from a reference model's hidden states.
    """
    layout, flat, name = _prepare(hidden, weight, labels, bias, cu_seqlens, ignore_index, validate, backend)
    return LinearSequenceLogps.apply(hidden, weight, bias, flat, layout, ignore_index, average, name)


def linear_safedpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    chosen_safe: torch.Tensor,
    rejected_safe: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    delta: float = 10.0,
    swap: bool = True,
    drop_both_unsafe: bool = True,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    average: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    inplace_backward: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> SafeDPOOutput:
    """``safedpo_loss`` from hidden states (N = 2B rows) and the LM head, never materializing the logits.

    Arguments as in ``linear_sequence_logps`` and ``safedpo_loss``. Returns a SafeDPOOutput; the loss is
    differentiable w.r.t. hidden, weight and bias.
    """
    layout, flat, name = _prepare(hidden, weight, labels, bias, cu_seqlens, ignore_index, validate, backend)
    check_pair_inputs(layout.n_seq, hidden.device, ref_logps, chosen_safe, rejected_safe)
    check_loss_hparams(beta, delta, label_smoothing)
    policy = LinearSequenceLogps.apply(hidden, weight, bias, flat, layout, ignore_index, average, name)
    return loss_from_logps(policy, ref_logps, chosen_safe, rejected_safe, beta, delta, swap, drop_both_unsafe, label_smoothing)


class LinearSafeDPOLoss(LossOptions):
    """nn.Module wrapper of ``linear_safedpo_loss`` (same constructor as SafeDPOLoss, without
    inplace_backward). ``forward(hidden, weight, labels, ref_logps, chosen_safe, rejected_safe, bias=None,
    cu_seqlens=None) -> SafeDPOOutput``.
    """

    def __init__(self, beta: float = 0.1, delta: float = 10.0, swap: bool = True, drop_both_unsafe: bool = True,
                 label_smoothing: float = 0.0, ignore_index: int = -100, average: bool = False,
                 backend: str = "auto", validate: bool = True):
        super().__init__(beta, delta, swap, drop_both_unsafe, label_smoothing, ignore_index, average, backend, validate)

    def forward(self, hidden, weight, labels, ref_logps, chosen_safe, rejected_safe, bias=None, cu_seqlens=None):
        return linear_safedpo_loss(
            hidden, weight, labels, ref_logps, chosen_safe, rejected_safe, bias=bias, cu_seqlens=cu_seqlens, **self.options
        )
