"""Fused-linear backward kernel: d loss / d logits for one chunk of rows, logits recomputed on chip.

Program (i, j) recomputes the (BLOCK_M, BLOCK_N) logits tile of rows i and vocabulary tile j with tl.dot
(float32 accumulation), forms g * (onehot - exp(z - lse)) in float32 and stores it in the chunk's
gradient buffer (the hidden dtype). The caller then takes d hidden = dz @ weight and
d weight += dz.T @ hidden with cuBLAS / ATen matmuls, which are deterministic. Only a (chunk x V) buffer
of dz exists at a time, never a (tokens x V) one.

Memory traffic: per tile, BLOCK_M x H hidden and BLOCK_N x H weight elements (mostly L2 hits) in,
BLOCK_M x BLOCK_N gradients out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._env import float32_rows, linear_chunk_bytes
from ._utils import Launch, cast_for_store
from .fused_linear_forward import linear_logits_tile, tile_launch


@triton.jit
def linear_dlogits_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, g_ptr, dz_ptr,
    rows, V, H, stride_h, stride_w, stride_dz, scale, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = r < rows
    col_ok = cols < V
    g = tl.load(g_ptr + r, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + r, mask=row_ok, other=0.0)
    label = tl.load(labels_ptr + r, mask=row_ok, other=-1).to(tl.int64)
    z = linear_logits_tile(h_ptr, w_ptr, b_ptr, r, row_ok, cols, col_ok, H, stride_h, stride_w, scale, softcap,
                           HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
    p = tl.exp(z - lse[:, None])
    onehot = (cols[None, :] == label[:, None]).to(tl.float32)
    live = row_ok & (g != 0.0)
    # d loss / d z0 for z0 = hidden @ weight.T + bias: through the scale and the softcap's 1 - (z / c)^2.
    dz = g[:, None] * (onehot - p) * scale
    if SOFTCAP:
        t = z / softcap
        dz = dz * (1.0 - t * t)
    dz = tl.where(live[:, None], dz, 0.0)
    tl.store(dz_ptr + r[:, None] * stride_dz + cols[None, :], cast_for_store(dz, dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def dlogits_launch(hidden, weight, bias, labels, lse, g, dz, logit_scale: float = 1.0, softcap=None) -> Launch:
    """The launch that fills dz (rows, V) for hidden (rows, H) contiguous; tiles as the forward's."""
    return tile_launch(linear_dlogits_kernel, hidden, weight, bias, dz, labels, lse, g, logit_scale=logit_scale,
                       softcap=softcap)


def dlogits_chunk_rows(V: int, dtype: torch.dtype, device=None) -> int:
    """Rows per backward chunk: its (rows x V) logits, counted as float32, within SAFEDPO_LINEAR_CHUNK_BYTES
    (see _env.py; the gradient buffer itself is in the hidden dtype, half of that for bf16)."""
    return float32_rows(linear_chunk_bytes(device), V)


def linear_dlogits(hidden, weight, bias, labels, lse, g, ignore_index: int, logit_scale: float = 1.0,
                   softcap=None) -> torch.Tensor:
    """d loss / d (hidden @ weight.T + bias), (rows, V) in the hidden dtype, for one chunk of rows,
    logits recomputed on chip (through the transform)."""
    rows = hidden.shape[0]
    dz = torch.empty(rows, weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    if rows:
        dlogits_launch(hidden.contiguous(), weight, bias, labels, lse, g, dz, logit_scale, softcap)()
    return dz
