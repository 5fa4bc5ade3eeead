"""safedpo::sequence_logps (logits -> per-sequence log-probs, per-token log-sum-exps, token counts and,
when asked, per-sequence token statistics), its
backward into a new buffer (safedpo::sequence_logps_grad) or into the logits themselves
(safedpo::sequence_logps_grad_), their fakes and autograd formulas. Sizes come from shapes only: no
host synchronization."""

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
from ._support import first_order_only, no_autocast, no_second_order, nones


@torch.library.custom_op("safedpo::sequence_logps", mutates_args=())
def sequence_logps_op(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: Optional[torch.Tensor], ignore_index: int,
                      average: bool, inplace: bool, backend: str, stats: bool, vocab_group: str = "",
                      context_group: str = "") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seq (N,) float32, lse (rows,) float32, count (N,) int64, token statistics (N, 4) float32 -- each
    sequence's summed entropy, mean logit, top-1 count and tokens, from the same pass; (0, 4) unless
    ``stats``).
    labels: (rows,) int64 contiguous, full vocabulary ids. ``inplace`` only changes the backward (into the
    logits' own storage). The groups, by name (see parallel.py): logits sharded along the vocabulary,
    tokens sliced along the sequences."""
    layout = layout_of(logits, cu_seqlens)
    vocab, context = resolve(vocab_group), resolve(context_group)
    kernels = backend_module(backend)
    counted = labels != ignore_index
    with no_autocast():
        out = combined_token_logps(lambda lab, st: kernels.logp_forward(logits, lab, layout, ignore_index, st), labels,
                                   logits.shape[-1], ignore_index, vocab, stats)
        seq, count = sequence_values(out[0], counted, layout, average, context)
        row_stats = sequence_statistics(out[2], counted, layout, context) if stats else out[1].new_zeros(0, 4)
    return seq, out[1], count, row_stats


@sequence_logps_op.register_fake
def _(logits, labels, cu_seqlens, ignore_index, average, inplace, backend, stats, vocab_group="", context_group=""):
    n = n_seq(logits, cu_seqlens)
    f32 = dict(dtype=torch.float32, device=logits.device)
    return (logits.new_empty(n, **f32), logits.new_empty(labels.shape[0], **f32), labels.new_empty(n, dtype=torch.int64),
            logits.new_empty(n if stats else 0, 4, **f32))


@torch.library.custom_op("safedpo::sequence_logps_grad", mutates_args=())
def sequence_logps_grad_op(grad_seq: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                           count: torch.Tensor, cu_seqlens: Optional[torch.Tensor], ignore_index: int, average: bool,
                           backend: str, vocab_group: str = "") -> torch.Tensor:
    """d loss / d logits (logits' shape and dtype, contiguous) for the sequences' d loss / d logp; with the
    global log-sum-exps, a vocabulary shard's gradient needs no communication."""
    layout = layout_of(logits, cu_seqlens)
    kernels = backend_module(backend)
    with no_autocast():
        g_tok = token_grads(grad_seq, labels != ignore_index, count, layout, average)
        grad = kernels.grad_buffer(logits.shape, logits.dtype, logits.device)
        local = kernel_labels(labels, logits.shape[-1], ignore_index, resolve(vocab_group))
        kernels.logp_backward(logits, local, lse, g_tok, grad, layout, ignore_index)
    return grad


@sequence_logps_grad_op.register_fake
def _(grad_seq, logits, labels, lse, count, cu_seqlens, ignore_index, average, backend, vocab_group=""):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("safedpo::sequence_logps_grad_", mutates_args=("logits",))
def sequence_logps_grad_inplace_op(grad_seq: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                                   count: torch.Tensor, cu_seqlens: Optional[torch.Tensor], ignore_index: int,
                                   average: bool, backend: str, vocab_group: str = "") -> None:
    """``sequence_logps_grad`` written over the logits themselves (their version counter moves on)."""
    layout = layout_of(logits, cu_seqlens)
    with no_autocast():
        g_tok = token_grads(grad_seq, labels != ignore_index, count, layout, average)
        local = kernel_labels(labels, logits.shape[-1], ignore_index, resolve(vocab_group))
        backend_module(backend).logp_backward(logits, local, lse, g_tok, logits, layout, ignore_index)


@sequence_logps_grad_inplace_op.register_fake
def _(grad_seq, logits, labels, lse, count, cu_seqlens, ignore_index, average, backend, vocab_group=""):
    return None


def _sequence_logps_setup(ctx, inputs, output):
    logits, labels, cu_seqlens, ignore_index, average, inplace, backend, _stats, *groups = inputs
    _, lse, count, row_stats = output
    ctx.mark_non_differentiable(count, row_stats)
    ctx.save_for_backward(logits, labels, lse, count, cu_seqlens)
    ctx.meta = (ignore_index, average, inplace, backend, groups[0] if groups else "")


@first_order_only
def _sequence_logps_backward(ctx, grad_seq, _grad_lse, _grad_count, _grad_stats):
    logits, labels, lse, count, cu_seqlens = ctx.saved_tensors
    ignore_index, average, inplace, backend, vocab_group = ctx.meta
    args = (grad_seq, logits, labels, lse, count, cu_seqlens, ignore_index, average, backend, vocab_group)
    rest = nones(ctx, 1)
    if not inplace:
        return sequence_logps_grad_op(*args), *rest
    sequence_logps_grad_inplace_op(*args)
    # The logits now hold their gradient (and a second backward through this graph fails autograd's
    # saved-tensor check). A new tensor over the same memory that needs no grad: AccumulateGrad takes it
    # as a leaf's .grad without a copy (it copies a returned tensor that requires grad).
    return logits.detach(), *rest


sequence_logps_op.register_autograd(_sequence_logps_backward, setup_context=_sequence_logps_setup)
sequence_logps_grad_op.register_autograd(no_second_order("sequence_logps_grad"))
