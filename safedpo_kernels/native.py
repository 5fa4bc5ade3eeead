"""Backend "native": the C++ CPU kernels of csrc/, as the Backend protocol's functions.

The extension is compiled on first use and cached (_native_build.py: where, when, and the lock that
serializes it); without a compiler (or with a failed build) a one-time warning is issued and "auto"
falls back to backend "torch". ``SAFEDPO_NATIVE=0`` turns the backend off.

Gradient buffers of ``sequence_logps``'s backward are recycled, as CUDA's caching allocator does: a
freed buffer stays with this process (counted in its RSS) for the next backward of a similar size,
which then skips the page faults a fresh multi-GB allocation takes. Idle buffers are kept up to
``$SAFEDPO_CPU_GRAD_CACHE_MB`` (default: a quarter of physical memory; 0 turns recycling off);
``empty_cache()`` returns them to the OS.
"""

from __future__ import annotations

import torch

from . import torch_chunked
from ._checks import rows_contiguous
from ._layout import Layout
from ._native_build import available, build_dir, build_info, cache_info, empty_cache, is_loaded, load, native_isa

__all__ = ["available", "build_dir", "build_info", "cache_info", "empty_cache", "is_loaded", "load", "native_isa",
           "grad_buffer",
           "logp_forward", "logp_backward", "prepare_weight", "linear_logits", "linear_forward", "linear_dlogits",
           "dlogits_chunk_rows"]


def grad_buffer(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor from the recycled buffers (or a new allocation)."""
    return torch.ops.safedpo_native.grad_buffer(list(shape), dtype)


def logp_forward(logits: torch.Tensor, labels: torch.Tensor, layout: Layout, ignore_index: int, stats: bool = False):
    """Per-token log-probs (rows,) float32 (0 where ignored) and log-sum-exp (rows,) float32; with
    ``stats`` also the (rows, STATS) token statistics (torch_chunked.STATS)."""
    logits = rows_contiguous(logits)
    op = torch.ops.safedpo_native.logp_forward_stats if stats else torch.ops.safedpo_native.logp_forward
    return op(logits, labels.long().contiguous(), layout.seq_len, *layout.row_strides(logits), ignore_index)


def logp_backward(logits, labels, lse, g_tok, grad, layout: Layout, ignore_index: int, softcap=None) -> None:
    """Write g_tok * (onehot - softmax) into grad (logits' shape; may be logits itself), times the
    softcap derivative 1 - (logits / softcap)^2 when ``softcap`` is set."""
    src = rows_contiguous(logits)
    dst = src if grad is logits else rows_contiguous(grad)
    torch.ops.safedpo_native.logp_backward(
        src, dst, labels.long().contiguous(), lse.contiguous(), g_tok.contiguous(), layout.seq_len,
        *layout.row_strides(src), *layout.row_strides(dst), 0.0 if softcap is None else float(softcap),
    )
    if dst is not grad:
        grad.copy_(dst)


def _chunk_forward(z: torch.Tensor, labels: torch.Tensor, ignore_index: int, stats: bool = False):
    return logp_forward(z, labels, Layout.single(z.shape[0]), ignore_index, stats)


def _chunk_grad(z, labels, lse, g, ignore_index: int, overwrite: bool = True, softcap=None) -> torch.Tensor:
    layout = Layout.single(z.shape[0])
    dst = z if overwrite else torch.empty_like(z)
    logp_backward(z, labels, lse, g, dst, layout, ignore_index, softcap)
    return dst


# The fused-linear path: the torch backend's chunked matmuls, with these kernels on each logits chunk.
prepare_weight = torch_chunked.prepare_weight
dlogits_chunk_rows = torch_chunked.dlogits_chunk_rows
linear_logits = torch_chunked.linear_logits


def linear_forward(hidden, weight, bias, labels, ignore_index: int, logit_scale: float = 1.0, softcap=None,
                   stats: bool = False):
    return torch_chunked.linear_forward(hidden, weight, bias, labels, ignore_index, logit_scale, softcap, stats,
                                        chunk_fn=_chunk_forward)


def linear_dlogits(hidden, weight, bias, labels, lse, g, ignore_index: int, logit_scale: float = 1.0,
                   softcap=None) -> torch.Tensor:
    return torch_chunked.linear_dlogits(hidden, weight, bias, labels, lse, g, ignore_index, logit_scale, softcap,
                                        grad_fn=_chunk_grad)
