"""Triton backend: launchers for the log-prob kernels (backend "triton").

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI checks the kernels).
The environment variable must be set before this module is first imported: Triton decides between
compiling and interpreting when the kernels are defined.
"""

from __future__ import annotations

import os

import torch
import triton

from .._checks import Layout, rows_contiguous
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


def logp_forward(logits: torch.Tensor, labels: torch.Tensor, layout: Layout, ignore_index: int):
    """Per-token log-probs (rows,) float32 (0 where ignored) and log-sum-exp (rows,) float32."""
    logits = rows_contiguous(logits)
    tok = torch.empty(layout.rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(tok)
    if layout.rows == 0:
        return tok, lse
    V = logits.shape[-1]
    block_r, block_v, num_warps = _tiles(V, layout.rows)
    grid = (triton.cdiv(layout.rows, block_r),)
    logprob_forward_kernel[grid](
        logits, labels, tok, lse, layout.rows, V, layout.seq_len, *layout.row_strides(logits), ignore_index,
        BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps,
    )
    return tok, lse


def logp_backward(logits, labels, lse, g_tok, grad, layout: Layout, ignore_index: int) -> None:
    """Write g_tok * (onehot - softmax) into grad (same shape as logits; may be logits itself)."""
    if layout.rows == 0:
        return
    src = rows_contiguous(logits)
    dst = rows_contiguous(grad)
    V = logits.shape[-1]
    block_r, block_v, num_warps = _tiles(V, layout.rows)
    grid = (triton.cdiv(layout.rows, block_r),)
    logprob_backward_kernel[grid](
        src, dst, labels, lse, g_tok, layout.rows, V, layout.seq_len,
        *layout.row_strides(src), *layout.row_strides(dst),
        BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps,
    )
    if dst is not grad:
        grad.copy_(dst)


# ---- fused-linear path ----

from .linear_backward import linear_dlogits_kernel  # noqa: E402
from .linear_forward import linear_forward_kernel  # noqa: E402


def _linear_tiles(rows: int, H: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, precision); SAFEDPO_LINEAR_BLOCK_N overrides BLOCK_N."""
    block_m = 64 if not INTERPRETED else max(16, min(64, triton.next_power_of_2(max(rows, 1))))
    block_n = int(os.environ.get("SAFEDPO_LINEAR_BLOCK_N", 128))
    block_k = 32 if dtype == torch.float32 else 64
    if INTERPRETED:
        block_k = max(16, min(128, triton.next_power_of_2(H)))
    # float32 inputs: IEEE products, since TF32 (10-bit mantissa) would break the 1e-5 contract.
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return block_m, block_n, block_k, 8, precision


def prepare_weight(weight: torch.Tensor, bias, hidden_dtype: torch.dtype):
    """tl.dot needs both operands in one dtype: a weight in another dtype is cast once (as autocast would)."""
    w = weight if weight.dtype == hidden_dtype else weight.to(hidden_dtype)
    return (w if w.stride(1) == 1 else w.contiguous()), bias


def _splits(rows: int, V: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Vocabulary slices per row block: enough programs to fill the GPU when there are few rows."""
    n_col_blocks = triton.cdiv(V, block_n)
    if "SAFEDPO_LINEAR_SPLITS" in os.environ:
        want = int(os.environ["SAFEDPO_LINEAR_SPLITS"])
    elif device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(4 * sms, triton.cdiv(rows, block_m))
    else:
        want = 1
    return max(1, min(want, n_col_blocks))


def linear_forward(hidden: torch.Tensor, weight, bias, labels: torch.Tensor, ignore_index: int):
    """hidden (rows, H) -> per-token log-probs and log-sum-exps (rows,) float32; logits stay on chip."""
    rows, H = hidden.shape
    V = weight.shape[0]
    tok = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    if rows == 0:
        return tok, tok.clone()
    hidden = hidden.contiguous()
    block_m, block_n, block_k, num_warps, precision = _linear_tiles(rows, H, hidden.dtype)
    splits = _splits(rows, V, block_m, block_n, hidden.device)
    cols_per_split = triton.cdiv(triton.cdiv(V, block_n), splits) * block_n
    splits = triton.cdiv(V, cols_per_split)
    part = torch.empty(3, rows, splits, dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(rows, block_m), splits)
    linear_forward_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, labels, part[0], part[1], part[2],
        rows, V, H, hidden.stride(0), weight.stride(0), cols_per_split, splits,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, UPCAST=INTERPRETED,
        num_warps=num_warps,
    )
    # Combine the slices' (max, sum) in a fixed order: deterministic, O(rows x splits).
    mx, sm, tgt = part
    top = mx.max(dim=1).values
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    lse = shift + torch.log((sm * torch.exp(mx - shift[:, None])).sum(dim=1))
    counted = labels != ignore_index
    valid = counted & (labels >= 0) & (labels < V)
    tok = torch.where(valid, tgt.sum(dim=1) - lse, torch.full_like(lse, float("nan")))
    return torch.where(counted, tok, torch.zeros_like(tok)), lse


def dlogits_chunk_rows(V: int, dtype: torch.dtype) -> int:
    """Rows per backward chunk: one (rows x V) gradient buffer within SAFEDPO_LINEAR_CHUNK_BYTES (1 GiB)."""
    budget = int(os.environ.get("SAFEDPO_LINEAR_CHUNK_BYTES", 1 << 30))
    return max(1, budget // (V * torch.finfo(dtype).bits // 8))


def linear_dlogits(hidden, weight, bias, labels, lse, g, ignore_index: int) -> torch.Tensor:
    """d loss / d logits (rows, V) in the hidden dtype for one chunk of rows, logits recomputed on chip."""
    rows, H = hidden.shape
    V = weight.shape[0]
    hidden = hidden.contiguous()
    dz = torch.empty(rows, V, dtype=hidden.dtype, device=hidden.device)
    if rows == 0:
        return dz
    block_m, block_n, block_k, num_warps, precision = _linear_tiles(rows, H, hidden.dtype)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(V, block_n))
    linear_dlogits_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, labels, lse, g, dz,
        rows, V, H, hidden.stride(0), weight.stride(0), dz.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, UPCAST=INTERPRETED,
        num_warps=num_warps,
    )
    return dz
