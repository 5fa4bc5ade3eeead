"""Public entry points: argument checks, backend dispatch and the autograd Function.

The autograd Function is deliberately plain (no torch.func transforms), which keeps it DDP- and
checkpoint-friendly. Its forward asks a backend for per-token log-probs and log-sum-exps (O(tokens)),
reduces them per sequence in a fixed order, and saves only O(tokens) values; its backward asks the same
backend to write g * (onehot - softmax) into a fresh buffer or into the logits themselves.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch
from torch import nn

from ._checks import Layout, flat_labels, check_logits_and_labels, check_pair_inputs
from ._loss import check_loss_hparams, loss_from_logps
from .reference import SafeDPOOutput

BACKENDS = ("auto", "triton", "native", "torch")


def native_available() -> bool:
    """True when the C++ CPU kernels (backend "native") can be used in this process."""
    if os.environ.get("SAFEDPO_NATIVE", "1") == "0":
        return False
    try:
        from . import native
    except ImportError:
        return False
    return native.available()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device`` (SPEC section 2, "backend")."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_available() else "torch"
        if device.type == "cpu" and native_available():
            return "native"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install 'triton>=3.0'")
        importlib.import_module(".triton", __package__).check_device(device)
    elif backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors, got {device.type} tensors")
        if not native_available():
            raise RuntimeError(
                "backend='native' is not available (no C++ compiler, a failed build, or SAFEDPO_NATIVE=0); "
                "use backend='torch' or 'auto'"
            )
    return backend


def backend_module(name: str):
    """The module implementing ``logp_forward`` / ``logp_backward`` for a resolved backend name."""
    module = {"triton": ".triton", "native": ".native", "torch": ".torch_chunked"}[name]
    return importlib.import_module(module, __package__)


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


class SequenceLogps(torch.autograd.Function):
    """logits (N, T, V) | (total, V) -> per-sequence log-probs (N,) float32; see ``sequence_logps``."""

    @staticmethod
    def forward(ctx, logits, labels, layout: Layout, ignore_index: int, average: bool, inplace: bool, backend: str):
        impl = backend_module(backend)
        tok, lse = impl.logp_forward(logits, labels, layout, ignore_index)
        counted = labels != ignore_index
        seq, count = segment_sums(tok, counted, layout)
        if average:
            seq = seq / count.clamp(min=1)
        ctx.save_for_backward(logits, labels, lse, count)
        ctx.meta = (layout, ignore_index, average, inplace, impl)
        return seq.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_seq):
        logits, labels, lse, count = ctx.saved_tensors
        layout, ignore_index, average, inplace, impl = ctx.meta
        g_tok = token_grads(grad_seq, labels != ignore_index, count, layout, average)
        if inplace:
            grad = logits
        elif hasattr(impl, "grad_buffer"):
            grad = impl.grad_buffer(logits.shape, logits.dtype)
        elif logits.device.type == "cpu":
            # A fresh CPU buffer is faulted in page by page on first write; a parallel zero-fill first is
            # markedly cheaper than taking those faults inside the kernel's exp loop.
            grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        else:
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        impl.logp_backward(logits, labels, lse, g_tok, grad, layout, ignore_index)
        return grad, None, None, None, None, None, None


def _prepare(logits, labels, cu_seqlens, ignore_index, validate, backend):
    layout = check_logits_and_labels(logits, labels, cu_seqlens, ignore_index, validate)
    return layout, flat_labels(labels), resolve_backend(backend, logits.device)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    average: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    inplace_backward: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Per-sequence log-probability of the labels, fused: no (tokens x V) float32 intermediate.

    Args:
        logits: (N, T, V) padded, or (total_tokens, V) packed with ``cu_seqlens``; float32, bfloat16 or
            float16. Each token row must be contiguous along V only (``logits[:, :-1]`` is fine).
        labels: (N, T) or (total_tokens,), int32/int64, already aligned with logits (labels[..., t] is
            the token logits[..., t, :] predicts); ``ignore_index`` marks tokens that do not count.
        average: divide each sum by its count of counted tokens (a row with none gives 0).
        cu_seqlens: int32 (N + 1,) cumulative lengths for the packed layout, as flash-attention's varlen API.
        inplace_backward: write d/d logits into the logits' own storage (the caller promises nothing
            else reads those logits afterwards); saves one logits-sized buffer.
        backend: "auto", "triton", "native" or "torch" (see README).
        validate: check labels are in [0, V) (one device sync). False skips it; kernels still never
            access memory out of bounds, and an out-of-range label yields NaN.

    Returns:
        (N,) float32, differentiable with respect to logits.
    """
    layout, flat, name = _prepare(logits, labels, cu_seqlens, ignore_index, validate, backend)
    return SequenceLogps.apply(logits, flat, layout, ignore_index, average, inplace_backward, name)


def safedpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    chosen_safe: torch.Tensor,
    rejected_safe: torch.Tensor,
    *,
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
            with the same ``average``. Carries no gradient.
        chosen_safe, rejected_safe: (B,) bool or 0/1 integers, True / 1 = safe.
        beta: > 0. delta: >= 0, the safety margin (not multiplied by beta). label_smoothing: in [0, 0.5].

    Returns:
        SafeDPOOutput(loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, kept): the
        scalar float32 loss (0 with zero gradients when no pair is kept) and (B,) metrics in the roles
        after T, computed in the same pass.
    """
    layout, flat, name = _prepare(logits, labels, cu_seqlens, ignore_index, validate, backend)
    check_pair_inputs(layout.n_seq, logits.device, ref_logps, chosen_safe, rejected_safe)
    check_loss_hparams(beta, delta, label_smoothing)
    policy = SequenceLogps.apply(logits, flat, layout, ignore_index, average, inplace_backward, name)
    return loss_from_logps(policy, ref_logps, chosen_safe, rejected_safe, beta, delta, swap, drop_both_unsafe, label_smoothing)


class LossOptions(nn.Module):
    """Shared constructor of the loss modules: hyper-parameters checked once and kept in ``options``."""

    def __init__(self, beta=0.1, delta=10.0, swap=True, drop_both_unsafe=True, label_smoothing=0.0,
                 ignore_index=-100, average=False, backend="auto", validate=True, **extra):
        super().__init__()
        check_loss_hparams(beta, delta, label_smoothing)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.options = dict(
            beta=beta, delta=delta, swap=swap, drop_both_unsafe=drop_both_unsafe, label_smoothing=label_smoothing,
            ignore_index=ignore_index, average=average, backend=backend, validate=validate, **extra,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class SafeDPOLoss(LossOptions):
    """nn.Module wrapper of ``safedpo_loss``: hyper-parameters at construction, tensors at call time.

    ``SafeDPOLoss(beta=0.1, delta=10.0, swap=True, drop_both_unsafe=True, label_smoothing=0.0,
    ignore_index=-100, average=False, inplace_backward=False, backend="auto", validate=True)``;
    ``forward(logits, labels, ref_logps, chosen_safe, rejected_safe, cu_seqlens=None) -> SafeDPOOutput``.
    """

    def __init__(self, beta: float = 0.1, delta: float = 10.0, swap: bool = True, drop_both_unsafe: bool = True,
                 label_smoothing: float = 0.0, ignore_index: int = -100, average: bool = False,
                 inplace_backward: bool = False, backend: str = "auto", validate: bool = True):
        super().__init__(beta, delta, swap, drop_both_unsafe, label_smoothing, ignore_index, average, backend, validate,
                         inplace_backward=inplace_backward)

    def forward(self, logits, labels, ref_logps, chosen_safe, rejected_safe, cu_seqlens=None) -> SafeDPOOutput:
        return safedpo_loss(logits, labels, ref_logps, chosen_safe, rejected_safe, cu_seqlens=cu_seqlens, **self.options)
