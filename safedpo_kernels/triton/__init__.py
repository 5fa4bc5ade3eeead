"""Triton backend: launchers for the log-prob kernels (backend "triton").

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI checks the kernels).
The environment variable must be set before this module is first imported: Triton decides between
compiling and interpreting when the kernels are defined.
"""

from __future__ import annotations

import os

import torch
import triton

from .._checks import Layout
from .logprob_backward import logprob_backward_kernel
from .logprob_forward import logprob_forward_kernel

INTERPRETED = type(logprob_forward_kernel).__name__ == "InterpretedFunction"


def check_device(device: torch.device) -> None:
    """RuntimeError when the kernels cannot run on tensors of this device."""
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
        return
    if device.type == "cpu":
        raise RuntimeError(
            "backend='triton' needs CUDA tensors; CPU tensors run only under the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing safedpo_kernels). Use backend='torch' or 'auto' on the CPU."
        )
    raise RuntimeError(f"backend='triton' does not support {device.type} tensors; use backend='torch'")


def _tiles(V: int, rows: int):
    """(BLOCK_R, BLOCK_V, num_warps).

    The interpreter pays per block iteration, so it gets big tiles by default. SAFEDPO_TRITON_BLOCK_V
    and SAFEDPO_TRITON_TILE (elements per program and iteration) override the defaults; the tests use
    small values to exercise the multi-block online reduction.
    """
    default = 1 << 16 if INTERPRETED else 8192
    max_tile = int(os.environ.get("SAFEDPO_TRITON_TILE", default))
    block_v = min(triton.next_power_of_2(V), int(os.environ.get("SAFEDPO_TRITON_BLOCK_V", default)), max_tile)
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), max_tile // block_v))
    num_warps = min(16, max(4, block_r * block_v // 512))
    return block_r, block_v, num_warps


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _row_strides(x: torch.Tensor, layout: Layout):
    """(stride_seq, stride_tok) in elements for addressing token row r (see Layout)."""
    return (x.stride(0), x.stride(1)) if layout.padded else (0, x.stride(0))


def logp_forward(logits: torch.Tensor, labels: torch.Tensor, layout: Layout, ignore_index: int):
    """Per-token log-probs (rows,) float32 (0 where ignored) and log-sum-exp (rows,) float32."""
    logits = _last_dim_contiguous(logits)
    tok = torch.empty(layout.rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(tok)
    if layout.rows == 0:
        return tok, lse
    V = logits.shape[-1]
    block_r, block_v, num_warps = _tiles(V, layout.rows)
    grid = (triton.cdiv(layout.rows, block_r),)
    logprob_forward_kernel[grid](
        logits, labels, tok, lse, layout.rows, V, layout.seq_len, *_row_strides(logits, layout), ignore_index,
        BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps,
    )
    return tok, lse


def logp_backward(logits, labels, lse, g_tok, grad, layout: Layout, ignore_index: int) -> None:
    """Write g_tok * (onehot - softmax) into grad (same shape as logits; may be logits itself)."""
    if layout.rows == 0:
        return
    src = _last_dim_contiguous(logits)
    dst = grad if grad.stride(-1) == 1 else torch.empty_like(grad, memory_format=torch.contiguous_format)
    V = logits.shape[-1]
    block_r, block_v, num_warps = _tiles(V, layout.rows)
    grid = (triton.cdiv(layout.rows, block_r),)
    logprob_backward_kernel[grid](
        src, dst, labels, lse, g_tok, layout.rows, V, layout.seq_len,
        *_row_strides(src, layout), *_row_strides(dst, layout),
        BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps,
    )
    if dst is not grad:
        grad.copy_(dst)
