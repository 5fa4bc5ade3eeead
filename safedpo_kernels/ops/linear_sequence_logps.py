"""safedpo::linear_sequence_logps (hidden states and the LM head -> per-sequence log-probs, logits never
materialized) and its backward safedpo::linear_sequence_logps_grad (logits recomputed chunk by chunk),
their fakes and autograd formulas."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..dispatch import backend_module
from ..parallel import resolve
from ..reductions import (
    combined_token_logps,
    kernel_labels,
    layout_of,
    n_seq,
    sequence_statistics,
    sequence_values,
    token_grads,
)
from ..transform import LogitTransform
from ._support import first_order_only, no_autocast, no_grad_slot, no_second_order, nones, specs
from .grads import LinearGrads, LinearHead, fake_grads


@torch.library.custom_op("safedpo::linear_sequence_logps", mutates_args=())
def linear_sequence_logps_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                             cu_seqlens: Optional[torch.Tensor], ignore_index: int, average: bool, logit_scale: float,
                             softcap: Optional[float], backend: str, stats: bool, vocab_group: str = "",
                             context_group: str = "") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seq (N,), lse (rows,) float32 (0 at ignored tokens), count (N,) int64, token statistics (N, 4)
    float32 of the transformed logits ((0, 4) unless ``stats``; see sequence_logps).

    Only the counted (response) tokens are computed at all: their hidden rows are gathered first (an
    O(tokens x H) copy), so prompt and padding tokens cost nothing. The logits stay on chip (Triton) or
    in chunks of rows (the CPU backends). With a ``vocab_group`` the weight (and bias) are this rank's
    rows of the head, with a ``context_group`` the tokens this rank's slice (see parallel.py)."""
    layout = layout_of(hidden, cu_seqlens)
    kernels = backend_module(backend)
    vocab, context = resolve(vocab_group), resolve(context_group)
    counted = labels != ignore_index
    idx = counted.nonzero().squeeze(1)
    with no_autocast():
        h = hidden.reshape(layout.rows, hidden.shape[-1]).index_select(0, idx)
        w, b = kernels.prepare_weight(weight, bias, hidden.dtype)
        lab = labels.index_select(0, idx)
        out = combined_token_logps(
            lambda local, st: kernels.linear_forward(h, w, b, local, ignore_index, logit_scale, softcap, st), lab,
            weight.shape[0], ignore_index, vocab, stats)
        tok = torch.zeros(layout.rows, dtype=torch.float32, device=hidden.device).index_copy_(0, idx, out[0])
        lse = torch.zeros_like(tok).index_copy_(0, idx, out[1])
        seq, count = sequence_values(tok, counted, layout, average, context)
        row_stats = tok.new_zeros(0, 4)
        if stats:
            tstats = tok.new_zeros(layout.rows, 3).index_copy_(0, idx, out[2])
            row_stats = sequence_statistics(tstats, counted, layout, context)
    return seq, lse, count, row_stats


@linear_sequence_logps_op.register_fake
def _(hidden, weight, bias, labels, cu_seqlens, ignore_index, average, logit_scale, softcap, backend, stats,
      vocab_group="", context_group=""):
    n = n_seq(hidden, cu_seqlens)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (hidden.new_empty(n, **f32), hidden.new_empty(labels.shape[0], **f32), labels.new_empty(n, dtype=torch.int64),
            hidden.new_empty(n if stats else 0, 4, **f32))


@torch.library.custom_op("safedpo::linear_sequence_logps_grad", mutates_args=())
def linear_sequence_logps_grad_op(grad_seq: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                  bias: Optional[torch.Tensor], labels: torch.Tensor, lse: torch.Tensor,
                                  count: torch.Tensor, cu_seqlens: Optional[torch.Tensor], ignore_index: int,
                                  average: bool, logit_scale: float, softcap: Optional[float], backend: str,
                                  need_hidden: bool, need_weight: bool, need_bias: bool,
                                  vocab_group: str = "") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias) in their inputs' shapes and dtypes (empty where not needed): the logits
    recomputed chunk by chunk (the upstream gradient is unknown in forward), d hidden = d logits @ weight
    and d weight += d logits.T @ hidden by matmuls, d weight accumulated in float32 in a fixed order. A
    vocabulary shard's d hidden is its part: all-reduced over the ``vocab_group``."""
    layout = layout_of(hidden, cu_seqlens)
    kernels = backend_module(backend)
    vocab = resolve(vocab_group)
    counted = labels != ignore_index
    idx = counted.nonzero().squeeze(1)
    H = hidden.shape[-1]
    with no_autocast():
        g = token_grads(grad_seq, counted, count, layout, average).index_select(0, idx)
        h = hidden.reshape(layout.rows, H).index_select(0, idx)
        w, b = kernels.prepare_weight(weight, bias, hidden.dtype)
        grads = LinearGrads(layout.rows, weight.shape[0], H, hidden, need_hidden, need_weight,
                            need_bias and bias is not None, vocab)
        local = kernel_labels(labels.index_select(0, idx), weight.shape[0], ignore_index, vocab)
        head = LinearHead(ignore_index, LogitTransform(logit_scale, softcap))
        grads.recompute(kernels, h, w, b, local, lse.index_select(0, idx), g, idx, head)
        grads.complete_hidden(vocab)
        out = grads.results(specs(hidden, weight, bias))
    return tuple(no_grad_slot(hidden) if o is None else o for o in out)


@linear_sequence_logps_grad_op.register_fake
def _(grad_seq, hidden, weight, bias, labels, lse, count, cu_seqlens, ignore_index, average, logit_scale, softcap,
      backend, need_hidden, need_weight, need_bias, vocab_group=""):
    return fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _linear_sequence_logps_setup(ctx, inputs, output):
    hidden, weight, bias, labels, cu_seqlens, ignore_index, average, logit_scale, softcap, backend, _stats, *groups = inputs
    _, lse, count, row_stats = output
    ctx.mark_non_differentiable(count, row_stats)
    ctx.save_for_backward(hidden, weight, bias, labels, lse, count, cu_seqlens)
    ctx.meta = (ignore_index, average, logit_scale, softcap, backend, groups[0] if groups else "")


@first_order_only
def _linear_sequence_logps_backward(ctx, grad_seq, _grad_lse, _grad_count, _grad_stats):
    hidden, weight, bias, labels, lse, count, cu_seqlens = ctx.saved_tensors
    ignore_index, average, logit_scale, softcap, backend, vocab = ctx.meta
    need = ctx.needs_input_grad[:3]
    grads = linear_sequence_logps_grad_op(grad_seq, hidden, weight, bias, labels, lse, count, cu_seqlens, ignore_index,
                                          average, logit_scale, softcap, backend, *need, vocab)
    return (*(g if n else None for g, n in zip(grads, need)), *nones(ctx, 3))


linear_sequence_logps_op.register_autograd(_linear_sequence_logps_backward, setup_context=_linear_sequence_logps_setup)
linear_sequence_logps_grad_op.register_autograd(no_second_order("linear_sequence_logps_grad"))
