"""The public entry points: argument checks, then the autograd Function of the chosen backend.

From logits: ``sequence_logps`` and ``safedpo_loss`` (module ``SafeDPOLoss``). From the last hidden
states and the LM head, never materializing the logits: ``linear_sequence_logps`` and
``linear_safedpo_loss`` (module ``LinearSafeDPOLoss``). Every check happens here, once, so every backend
sees the same validated inputs and raises the same errors.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from ._checks import (
    check_denominators,
    check_labels_in_range,
    check_linear_weight,
    check_logits_and_labels,
    check_pair_inputs,
    flat_labels,
)
from .dispatch import resolve_backend
from .loss import Pairs, SafeDPOOutput, TokenStats, loss_from_logps
from .ops import autocast_operands, linear_safedpo_loss_op, linear_sequence_logps_op, sequence_logps_op
from .options import CallOptions, LossOptions
from .parallel import Groups, check_consistent, unwrap


def _total_vocab(width: int, groups: Groups) -> int:
    """The full vocabulary: this rank's ``width`` columns times the vocabulary group's size."""
    if groups.vocab is None:
        return width
    import torch.distributed as dist

    return width * dist.get_world_size(groups.vocab)


class Prepared(NamedTuple):
    """A call's inputs once checked: the local logits or hidden states (a DTensor as its shard), the head's
    local weight and bias (fused-linear path), the layout, the flat labels, the resolved backend's name
    and the process groups (the call's, or those its DTensors imply)."""

    x: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    layout: object
    labels: torch.Tensor
    backend: str
    groups: Groups


def _prepare_logits(logits, labels, cu_seqlens, call: CallOptions) -> Prepared:
    local, groups = unwrap(dict(logits=logits), -1, *call.groups)
    logits = local["logits"]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    width = logits.shape[-1] if logits.dim() else 0
    layout = _checked_layout(logits, labels, cu_seqlens, call, groups, width)
    return Prepared(logits, None, None, layout, flat_labels(labels), resolve_backend(call.backend, logits.device), groups)


def _prepare_linear(hidden, weight, bias, labels, cu_seqlens, call: CallOptions) -> Prepared:
    local, groups = unwrap(dict(hidden=hidden, weight=weight, bias=bias), 0, *call.groups)
    hidden, weight, bias = local["hidden"], local["weight"], local["bias"]
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    width = check_linear_weight(hidden, weight, bias)
    layout = _checked_layout(hidden, labels, cu_seqlens, call, groups, width, logits_name="hidden")
    hidden, weight, bias = autocast_operands(hidden, weight, bias)
    return Prepared(hidden, weight, bias, layout, flat_labels(labels), resolve_backend(call.backend, hidden.device),
                    groups)


def _checked_layout(x, labels, cu_seqlens, call: CallOptions, groups: Groups, width: int, **names):
    """The shapes first, then what the ranks of the groups must agree on (collectives, which every rank
    reaches), then the labels' range over the whole vocabulary: no rank raises alone before a collective."""
    layout = check_logits_and_labels(x, labels, cu_seqlens, call.ignore_index, call.validate, **names)
    if call.validate:
        check_consistent(groups, width, labels, layout.n_seq)
        check_labels_in_range(labels, _total_vocab(width, groups), call.ignore_index, layout.padded)
    return layout


def _logits_op(p: Prepared, call: CallOptions, average: bool) -> tuple:
    return sequence_logps_op(p.x, p.labels, p.layout.cu_seqlens, call.ignore_index, average, call.inplace_backward,
                             p.backend, call.token_stats, *p.groups.names())


def _with_stats(logps: torch.Tensor, row_stats: torch.Tensor, call: CallOptions):
    return (logps, TokenStats.of(row_stats)) if call.token_stats else logps


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, average: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None, inplace_backward: bool = False, backend: str = "auto",
    validate: bool = True, vocab_group=None, context_group=None, token_stats: bool = False,
) -> torch.Tensor:
    """Per-sequence log-probability of the labels, fused: no (tokens x V) float32 intermediate.

    Args:
        logits: (N, T, V) padded, or (total_tokens, V) packed with ``cu_seqlens``; float32, bfloat16 or
            float16. Any strides (``logits[:, :-1]`` is read in place; a strided vocabulary is copied).
        labels: (N, T) or (total_tokens,), int32/int64, already aligned with logits (labels[..., t] is
            the token logits[..., t, :] predicts); ``ignore_index`` marks tokens that do not count.
        average: divide each sum by its count of counted tokens (a row with none gives 0).
        cu_seqlens: int32 (N + 1,) cumulative lengths for the packed layout, as flash-attention's varlen API.
        inplace_backward: write d/d logits into the logits' own storage (the caller promises nothing
            else reads those logits afterwards); saves one logits-sized buffer.
        backend: "auto", "triton", "native" or "torch" (see docs/backends.md).
        validate: check labels are in [0, V) (one device sync). False skips it; kernels still never
            access memory out of bounds, and an out-of-range label yields NaN.
        vocab_group: a torch.distributed ProcessGroup of p ranks over which the logits are split along the
            vocabulary in equal shards, rank r holding columns [r V/p, (r + 1) V/p) (a DTensor sharded on
            its last dimension implies its mesh's group); labels are full-vocabulary ids, equal on every
            rank. Per token 3 floats are all-reduced; the vocabulary is never gathered.
        context_group: a ProcessGroup over which every sequence's tokens are split (each rank a slice of
            every sequence: padded (N, T_r, V), or packed with this rank's own cu_seqlens); the sequence
            sums are all-reduced. With either, the result is the same on every rank of the group.
        token_stats: also return, from the same pass, each sequence's ``TokenStats`` (summed entropy,
            summed mean logit, top-1 count, tokens; no gradient): then the result is (logps, TokenStats).

    Returns:
        (N,) float32, differentiable with respect to logits (with token_stats: (that, TokenStats)).
    """
    call = CallOptions.of(ignore_index, backend, validate, inplace_backward, vocab_group=vocab_group,
                          context_group=context_group, token_stats=token_stats)
    return logps_on_logits(logits, labels, average, call, cu_seqlens)


def logps_on_logits(logits, labels, average: bool, call: CallOptions, cu_seqlens=None):
    """``sequence_logps`` with its other keywords as one object (what trainers pass on)."""
    out = _logits_op(_prepare_logits(logits, labels, cu_seqlens, call), call, average)
    return _with_stats(out[0], out[3], call)


def safedpo_loss(
    logits: torch.Tensor, labels: torch.Tensor, ref_logps: Optional[torch.Tensor], chosen_safe: torch.Tensor,
    rejected_safe: torch.Tensor, *, beta: float = 0.1, delta: float = 10.0, swap: bool = True,
    drop_both_unsafe: bool = True, label_smoothing: float = 0.0, ignore_index: int = -100, average: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None, inplace_backward: bool = False, backend: str = "auto",
    validate: bool = True, loss_type="sigmoid", reduction: str = "mean", vocab_group=None, context_group=None,
    loss_weights=None, denominators=None, token_stats: bool = False,
) -> SafeDPOOutput:
    """SafeDPO loss (arXiv 2505.20065, Eq. 12) from the policy's logits, fused with the log-prob pass.

    Rows [0:B] of logits/labels are the chosen (helpfulness-preferred) responses, rows [B:2B] the
    rejected ones. Pairs are first transformed by T: a pair whose preferred response is unsafe and the
    other safe is swapped (``swap``); a pair with both unsafe is dropped (``drop_both_unsafe``). Then
    u = beta * [(logp_w - ref_w) - (logp_l - ref_l)] - (h_l - h_w) * delta and the loss is the mean over
    kept pairs of -(1 - eps) log sigmoid(u) - eps log sigmoid(-u), eps = ``label_smoothing``.

    Args:
        logits, labels, ignore_index, average, cu_seqlens, inplace_backward, backend, validate: as in
            ``sequence_logps``; N = 2B.
        ref_logps: (2B,) float, the reference policy's sequence log-probs in the same row order, computed
            with the same ``average``, or None (reference-free: zeros). Carries no gradient.
        chosen_safe, rejected_safe: (B,) bool or 0/1 integers, True / 1 = safe.
        beta: > 0. delta: >= 0, the safety margin (not multiplied by beta). label_smoothing: in [0, 0.5].
        loss_type: "sigmoid" (SafeDPO), "robust", "hinge", "ipo" or "sft", or a list of distinct names
            mixed by ``loss_weights`` (see ``safedpo_loss_from_logps``); the "sft" term's token counts come
            from the same pass.
        reduction: "mean" over kept pairs (the "sft" term: over their preferred responses' tokens), or
            "sum". denominators: (pairs, tokens), the divisors of "mean" instead of this call's own (a
            trainer's counts over its global batch; see ``loss_denominators``).
        token_stats: also compute, in the same pass, the rows' ``TokenStats`` (the output's token_stats).

    Returns:
        SafeDPOOutput(loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, kept, swapped,
        loss_terms, token_stats): the scalar float32 loss (0 with zero gradients when no pair is kept),
        (B,) metrics in the roles after T, computed in the same pass, and each term's weighted share.
    """
    options = LossOptions(beta=beta, delta=delta, swap=swap, drop_both_unsafe=drop_both_unsafe,
                          label_smoothing=label_smoothing, loss_type=loss_type, reduction=reduction, average=average,
                          loss_weights=loss_weights)
    call = CallOptions.of(ignore_index, backend, validate, inplace_backward, vocab_group=vocab_group,
                          context_group=context_group, token_stats=token_stats)
    return loss_on_logits(logits, labels, Pairs(ref_logps, chosen_safe, rejected_safe, denominators), options, call,
                          cu_seqlens)


def _checked_pairs(pairs: Pairs, n_seq: int, device, options: LossOptions, call: CallOptions) -> Pairs:
    check_pair_inputs(n_seq, device, pairs.ref_logps, pairs.chosen_safe, pairs.rejected_safe, validate=call.validate)
    # Built anew, not through _replace: torch 2.7's dynamo refuses NamedTuple._replace in a compiled step.
    return Pairs(pairs.ref_logps, pairs.chosen_safe, pairs.rejected_safe,
                 check_denominators(pairs.denominators, options, device))


def loss_on_logits(logits, labels, pairs: Pairs, options: LossOptions, call: CallOptions,
                   cu_seqlens=None) -> SafeDPOOutput:
    """``safedpo_loss`` with its keywords as two objects (what trainers pass on)."""
    p = _prepare_logits(logits, labels, cu_seqlens, call)
    pairs = _checked_pairs(pairs, p.layout.n_seq, p.x.device, options, call)
    logps, _, counts, row_stats = _logits_op(p, call, options.average)
    return loss_from_logps(logps, pairs.ref_logps, pairs.chosen_safe, pairs.rejected_safe, options, counts,
                           pairs.denominators, TokenStats.of(row_stats) if call.token_stats else None)


def linear_sequence_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100, average: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
    inplace_backward: bool = False, backend: str = "auto", validate: bool = True, logit_scale: float = 1.0,
    softcap: Optional[float] = None, vocab_group=None, context_group=None, token_stats: bool = False,
) -> torch.Tensor:
    """``sequence_logps`` of the logits of hidden states and an LM head, without ever materializing them.

    The logits are z = softcap * tanh(logit_scale * z0 / softcap) when ``softcap`` is set, else
    logit_scale * z0, with z0 = hidden @ weight.T + bias: Gemma 2/3's final_logit_softcapping, Cohere's
    logit_scale, Granite's 1 / logits_scaling, a sampling temperature 1 / logit_scale.

    Args:
        hidden: (N, T, H) padded or (total_tokens, H) packed last hidden states; float32/bfloat16/float16.
        weight: (V, H) LM head weight (tied or not; frozen is fine). A dtype other than hidden's is cast
            once for the kernels; its gradient comes back in its own dtype. Inside torch.autocast,
            hidden, weight and bias are taken in autocast's dtype (as F.linear would get them); the
            logits stay float32.
        labels: (N, T) or (total_tokens,) int32/int64 token ids aligned with hidden, ``ignore_index`` for
            prompt/padding tokens (those cost nothing: only counted tokens are computed).
        bias: optional (V,) LM head bias.
        ignore_index, average, cu_seqlens, backend, validate: as in ``sequence_logps``.
        inplace_backward: accepted so that the logits and fused-linear entry points take the same
            keywords; no logits exist here to overwrite, so it changes nothing.
        logit_scale: > 0 (default 1). softcap: None or > 0.
        vocab_group: the weight (and bias) are this rank's rows [r V/p, (r + 1) V/p) of the head, hidden
            the same on every rank (a DTensor weight sharded on dim 0 implies its mesh's group); d hidden
            comes back complete on every rank. context_group: as in ``sequence_logps``.
        token_stats: as in ``sequence_logps``, of the transformed logits.

    Returns:
        (N,) float32, differentiable w.r.t. hidden, weight and bias (the logits are recomputed chunk by
        chunk in backward, since the upstream gradient is unknown in forward); with token_stats, (that,
        TokenStats). Under torch.no_grad() this is the intended way to compute ref_logps from a
        reference model's hidden states.
    """
    call = CallOptions.of(ignore_index, backend, validate, inplace_backward, logit_scale, softcap, vocab_group,
                          context_group, token_stats)
    return logps_on_hidden(hidden, weight, bias, labels, average, call, cu_seqlens)


def logps_on_hidden(hidden, weight, bias, labels, average: bool, call: CallOptions, cu_seqlens=None):
    """``linear_sequence_logps`` with its other keywords as one object (what trainers pass on)."""
    p = _prepare_linear(hidden, weight, bias, labels, cu_seqlens, call)
    out = linear_sequence_logps_op(p.x, p.weight, p.bias, p.labels, p.layout.cu_seqlens, call.ignore_index, average,
                                   call.transform.logit_scale, call.transform.softcap, p.backend, call.token_stats,
                                   *p.groups.names())
    return _with_stats(out[0], out[3], call)


def linear_safedpo_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ref_logps: Optional[torch.Tensor],
    chosen_safe: torch.Tensor, rejected_safe: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
    beta: float = 0.1, delta: float = 10.0, swap: bool = True, drop_both_unsafe: bool = True,
    label_smoothing: float = 0.0, ignore_index: int = -100, average: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None, inplace_backward: bool = False, backend: str = "auto",
    validate: bool = True, logit_scale: float = 1.0, softcap: Optional[float] = None, loss_type="sigmoid",
    reduction: str = "mean", vocab_group=None, context_group=None, loss_weights=None, denominators=None,
    token_stats: bool = False,
) -> SafeDPOOutput:
    """``safedpo_loss`` from hidden states (N = 2B rows) and the LM head, never materializing the logits.

    Arguments as in ``linear_sequence_logps`` and ``safedpo_loss``. Returns a SafeDPOOutput; the loss is
    differentiable w.r.t. hidden, weight and bias.

    The gradients are formed during the forward, a chunk of pairs at a time (a pair's loss needs only
    its own two log-probs): 3 matmuls over the response tokens (logits, d hidden, d weight) instead of
    the 4 of recomputing the logits in backward; backward only scales them by the upstream gradient.
    Only the gradients of inputs that require grad are formed, none under torch.no_grad(); a second
    backward through the same graph raises. SAFEDPO_LINEAR_CHUNK_BYTES bounds a chunk's float32
    logits (default 4 GiB on CUDA, 512 MiB elsewhere); a pair larger than that alone is computed in two
    passes (4 matmuls), so memory stays bounded at any length.
    """
    options = LossOptions(beta=beta, delta=delta, swap=swap, drop_both_unsafe=drop_both_unsafe,
                          label_smoothing=label_smoothing, loss_type=loss_type, reduction=reduction, average=average,
                          loss_weights=loss_weights)
    call = CallOptions.of(ignore_index, backend, validate, inplace_backward, logit_scale, softcap, vocab_group,
                          context_group, token_stats)
    return loss_on_hidden(hidden, weight, bias, labels, Pairs(ref_logps, chosen_safe, rejected_safe, denominators),
                          options, call, cu_seqlens)


def loss_on_hidden(hidden, weight, bias, labels, pairs: Pairs, options: LossOptions, call: CallOptions,
                   cu_seqlens=None) -> SafeDPOOutput:
    """``linear_safedpo_loss`` with its keywords as two objects (what trainers pass on)."""
    p = _prepare_linear(hidden, weight, bias, labels, cu_seqlens, call)
    pairs = _checked_pairs(pairs, p.layout.n_seq, p.x.device, options, call)
    grad_on = torch.is_grad_enabled()
    wants = (grad_on and p.x.requires_grad, grad_on and p.weight.requires_grad,
             grad_on and p.bias is not None and p.bias.requires_grad)
    ref_logps = None if pairs.ref_logps is None else pairs.ref_logps.detach()
    out = linear_safedpo_loss_op(
        p.x, p.weight, p.bias, p.labels, ref_logps, pairs.chosen_safe, pairs.rejected_safe, p.layout.cu_seqlens,
        call.ignore_index, call.transform.logit_scale, call.transform.softcap, *options.op_args(), pairs.denominators,
        call.token_stats, p.backend, *wants, *p.groups.names())
    return SafeDPOOutput(*out[:8], token_stats=TokenStats.of(out[8]) if call.token_stats else None)


class SafeDPOLoss(nn.Module):
    """nn.Module wrapper of ``safedpo_loss``: hyper-parameters at construction (checked then, kept as
    ``self.options``, a ``LossOptions``), tensors at call time.

    ``SafeDPOLoss(beta=0.1, delta=10.0, swap=True, drop_both_unsafe=True, label_smoothing=0.0,
    ignore_index=-100, average=False, inplace_backward=False, backend="auto", validate=True,
    loss_type="sigmoid", reduction="mean", vocab_group=None, context_group=None, loss_weights=None,
    token_stats=False)``;
    ``forward(logits, labels, ref_logps, chosen_safe, rejected_safe, cu_seqlens=None, denominators=None)
    -> SafeDPOOutput``.
    """

    def __init__(self, beta: float = 0.1, delta: float = 10.0, swap: bool = True, drop_both_unsafe: bool = True,
                 label_smoothing: float = 0.0, ignore_index: int = -100, average: bool = False,
                 inplace_backward: bool = False, backend: str = "auto", validate: bool = True,
                 loss_type="sigmoid", reduction: str = "mean", vocab_group=None, context_group=None,
                 loss_weights=None, token_stats: bool = False):
        super().__init__()
        self.options = LossOptions(beta=beta, delta=delta, swap=swap, drop_both_unsafe=drop_both_unsafe,
                                   label_smoothing=label_smoothing, loss_type=loss_type, reduction=reduction,
                                   average=average, loss_weights=loss_weights)
        self.call = CallOptions.of(ignore_index, backend, validate, inplace_backward, vocab_group=vocab_group,
                                   context_group=context_group, token_stats=token_stats)

    def forward(self, logits, labels, ref_logps, chosen_safe, rejected_safe, cu_seqlens=None,
                denominators=None) -> SafeDPOOutput:
        return loss_on_logits(logits, labels, Pairs(ref_logps, chosen_safe, rejected_safe, denominators), self.options,
                              self.call, cu_seqlens)

    def extra_repr(self) -> str:
        return _repr(self.options, self.call, linear=False)


class LinearSafeDPOLoss(nn.Module):
    """nn.Module wrapper of ``linear_safedpo_loss``: SafeDPOLoss's constructor without inplace_backward,
    with the logit transform (``logit_scale=1.0, softcap=None``) and the parallel layouts (``vocab_group=None,
    context_group=None``). ``forward(hidden, weight, labels, ref_logps, chosen_safe, rejected_safe, bias=None,
    cu_seqlens=None, denominators=None) -> SafeDPOOutput``.
    """

    def __init__(self, beta: float = 0.1, delta: float = 10.0, swap: bool = True, drop_both_unsafe: bool = True,
                 label_smoothing: float = 0.0, ignore_index: int = -100, average: bool = False,
                 backend: str = "auto", validate: bool = True, logit_scale: float = 1.0,
                 softcap: Optional[float] = None, loss_type="sigmoid", reduction: str = "mean",
                 vocab_group=None, context_group=None, loss_weights=None, token_stats: bool = False):
        super().__init__()
        self.options = LossOptions(beta=beta, delta=delta, swap=swap, drop_both_unsafe=drop_both_unsafe,
                                   label_smoothing=label_smoothing, loss_type=loss_type, reduction=reduction,
                                   average=average, loss_weights=loss_weights)
        self.call = CallOptions.of(ignore_index, backend, validate, False, logit_scale, softcap, vocab_group,
                                   context_group, token_stats)

    def forward(self, hidden, weight, labels, ref_logps, chosen_safe, rejected_safe, bias=None, cu_seqlens=None,
                denominators=None):
        return loss_on_hidden(hidden, weight, bias, labels, Pairs(ref_logps, chosen_safe, rejected_safe, denominators),
                              self.options, self.call, cu_seqlens)

    def extra_repr(self) -> str:
        return _repr(self.options, self.call, linear=True)


def _repr(options: LossOptions, call: CallOptions, linear: bool) -> str:
    shown = call.as_dict()
    for k in (("inplace_backward",) if linear else ("logit_scale", "softcap")):
        shown.pop(k)
    return ", ".join(f"{k}={v!r}" for k, v in {**options.as_dict(), **shown}.items())
