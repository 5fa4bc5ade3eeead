"""Fused-linear forward kernel: log-sum-exp and target logit of hidden @ weight.T + bias, on chip.

Program (i, j) takes BLOCK_M token rows and the j-th of SPLITS contiguous slices of the vocabulary. For
each BLOCK_N-wide vocabulary tile it forms the logits tile with tl.dot over H in BLOCK_K steps (float32
accumulation; IEEE precision for float32 inputs, so no TF32 rounding), then folds the tile into a running
(max, sum of exp) per row and picks the target logit where the label falls in the tile. It writes one
partial (max, sum, target) per row and slice -- with STATS also the weighted sum of the logits, their sum
and the maximum before the label (torch_chunked.STATS) -- and the slices are combined afterwards in a
fixed order, so the result is deterministic (no atomics). Logits never leave the chip.

Memory traffic: hidden rows are read once per vocabulary tile (from L2 in practice), the weight once per
row block; 12 bytes per row and slice are written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import torch_chunked
from .._env import env_choice, env_int, linear_splits
from ..torch_chunked import STATS
from ._utils import INTERPRETED, Launch, online_lse_update, online_stats_update


@triton.jit
def tanh(x):
    """tanh from one exp of a non-positive argument: no overflow at any |x|, exact sign, |error| ~ 1e-7."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def linear_logits_tile(h_ptr, w_ptr, b_ptr, rows_idx, row_ok, cols, col_ok, H, stride_h, stride_w, scale, softcap,
                       HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 tile of the logits: with z0 = hidden[rows] @ weight[cols].T (+ bias[cols]),
    softcap * tanh(scale * z0 / softcap) with SOFTCAP, else scale * z0.

    UPCAST is for the Triton interpreter only, whose tl.dot mishandles bf16 (stored as uint16) and
    accumulates fp16 in fp16; compiled kernels feed the tensor cores the input dtype directly.
    """
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_ptr + rows_idx[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = acc * scale
    if SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc


@triton.jit
def linear_logits_kernel(
    h_ptr, w_ptr, b_ptr, z_ptr, rows, V, H, stride_h, stride_w, stride_z, scale, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (i, j) writes the (BLOCK_M, BLOCK_N) float32 logits tile of rows i and vocabulary tile j
    (transformed): the chunk buffer that the gradient-in-forward loss then reduces and differentiates in
    place. float32 rather than the input dtype: rounding logits to bf16 moves a log-prob by ~|z| / 256."""
    r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = r < rows
    col_ok = cols < V
    z = linear_logits_tile(h_ptr, w_ptr, b_ptr, r, row_ok, cols, col_ok, H, stride_h, stride_w, scale, softcap,
                           HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
    tl.store(z_ptr + r[:, None] * stride_z + cols[None, :], z, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def linear_forward_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, part_ptr,
    rows, V, H, stride_h, stride_w, cols_per_split, SPLITS, scale, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, STATS: tl.constexpr = False,
):
    """Program (i, j): rows block i, vocabulary slice j; writes part[k, row, j] for k = max, sum of exp,
    target logit (and with STATS: sum of exp * z, sum of z, maximum before the label)."""
    split = tl.program_id(1)
    r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = r < rows
    label = tl.load(labels_ptr + r, mask=row_ok, other=-1).to(tl.int64)
    v_begin = split * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    tgt = tl.zeros([BLOCK_M], tl.float32)
    if STATS:
        s1 = tl.zeros([BLOCK_M], tl.float32)
        zs = tl.zeros([BLOCK_M], tl.float32)
        before = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < v_end
        z = linear_logits_tile(h_ptr, w_ptr, b_ptr, r, row_ok, cols.to(tl.int64), col_ok, H, stride_h, stride_w,
                               scale, softcap, HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        if STATS:
            m, s, s1, zs, before = online_stats_update(m, s, s1, zs, before, z, col_ok[None, :],
                                                       cols[None, :] < label[:, None])
        else:
            m, s = online_lse_update(m, s, z)
        tgt += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
    out = r * SPLITS + split
    plane = rows * SPLITS
    tl.store(part_ptr + out, m, mask=row_ok)
    tl.store(part_ptr + plane + out, s, mask=row_ok)
    tl.store(part_ptr + 2 * plane + out, tgt, mask=row_ok)
    if STATS:
        tl.store(part_ptr + 3 * plane + out, s1, mask=row_ok)
        tl.store(part_ptr + 4 * plane + out, zs, mask=row_ok)
        tl.store(part_ptr + 5 * plane + out, before, mask=row_ok)


def linear_tiles(rows: int, H: int, dtype: torch.dtype):
    """Constexprs and num_warps of both fused-linear kernels: BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST.

    Compiled defaults, from the compile report (bench/results/gpu-compile-*.md): 64 x 128 logits tiles
    and 8 warps. bf16/fp16 take BLOCK_K = 64: tensor-core tiles (mma on sm_80; on sm_90 64 rows are what
    a warpgroup MMA needs), 3 pipeline stages in 48 KiB (sm_80) / 73 KiB (sm_90) of shared memory,
    74-176 registers, no spills, 1-3 blocks per SM -- a matmul-shaped kernel, fast through its tiles,
    not its occupancy. float32 runs IEEE FMA products (TF32 would break the 1e-5 contract) and takes
    BLOCK_K = 16: with 32 the forward used all 255 registers on sm_80 (the point where a compiler change
    starts spilling); with 16 every float32 variant stays at 128-202 and halves the shared memory.

    SAFEDPO_LINEAR_BLOCK_N overrides BLOCK_N (a power of two).
    """
    block_m = 64 if not INTERPRETED else max(16, min(64, triton.next_power_of_2(max(rows, 1))))
    block_n = env_int("SAFEDPO_LINEAR_BLOCK_N", 128, minimum=16, power_of_two=True)
    block_k = 16 if dtype == torch.float32 else 64
    if INTERPRETED:
        block_k = max(16, min(128, triton.next_power_of_2(H)))
    # float32 inputs: IEEE products, since TF32 (10-bit mantissa) would break the 1e-5 contract.
    precision = "ieee" if dtype == torch.float32 else "tf32"
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, UPCAST=INTERPRETED)
    return constexprs, 8


def prepare_weight(weight: torch.Tensor, bias, hidden_dtype: torch.dtype):
    """tl.dot needs both operands in one dtype: a weight in another dtype is cast once (as autocast would).
    The kernels address the weight by its row stride and the bias as contiguous."""
    w = weight if weight.dtype == hidden_dtype else weight.to(hidden_dtype)
    w = w if w.stride(1) == 1 else w.contiguous()
    return w, None if bias is None else bias.contiguous()


def _splits(rows: int, V: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Vocabulary slices per row block: enough programs to fill the GPU when there are few rows."""
    n_col_blocks = triton.cdiv(V, block_n)
    want = linear_splits()
    if want is None:
        want = 1
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            want = triton.cdiv(4 * sms, triton.cdiv(rows, block_m))
    return max(1, min(want, n_col_blocks))


def _transform_args(logit_scale: float, softcap):
    """(runtime scale, runtime softcap) arguments and the SOFTCAP constexpr of the linear kernels."""
    return (float(logit_scale), 1.0 if softcap is None else float(softcap)), softcap is not None


def tile_launch(kernel, hidden, weight, bias, out, *per_row, logit_scale: float = 1.0, softcap=None) -> Launch:
    """A launch of one program per (row block, vocabulary tile) that writes a (rows, V) ``out`` from
    hidden (rows, H) contiguous: ``kernel(h, w, b, *per_row, out, rows, V, H, strides, scale, softcap)``."""
    rows, H = hidden.shape
    V = weight.shape[0]
    constexprs, num_warps = linear_tiles(rows, H, hidden.dtype)
    transform, has_cap = _transform_args(logit_scale, softcap)
    return Launch(
        kernel,
        (triton.cdiv(rows, constexprs["BLOCK_M"]), triton.cdiv(V, constexprs["BLOCK_N"])),
        (hidden, weight, bias if bias is not None else hidden, *per_row, out, rows, V, H, hidden.stride(0),
         weight.stride(0), out.stride(0), *transform),
        dict(HAS_BIAS=bias is not None, SOFTCAP=has_cap, **constexprs),
        num_warps,
    )


def logits_launch(hidden, weight, bias, z, logit_scale: float = 1.0, softcap=None) -> Launch:
    """The launch writing the transformed float32 logits (rows, V) of hidden (rows, H) contiguous into z."""
    return tile_launch(linear_logits_kernel, hidden, weight, bias, z, logit_scale=logit_scale, softcap=softcap)


def linear_logits(hidden: torch.Tensor, weight, bias, logit_scale: float = 1.0, softcap=None) -> torch.Tensor:
    """The float32 (rows, V) logits of one chunk of rows, transformed, by a Triton GEMM kernel, or by
    cuBLAS (float32 accumulation and result from half operands) when SAFEDPO_LINEAR_GEMM=cublas."""
    if env_choice("SAFEDPO_LINEAR_GEMM", "triton", ("triton", "cublas")) == "cublas":
        return torch_chunked.linear_logits(hidden, weight, None if bias is None else bias.float(), logit_scale, softcap)
    z = torch.empty(hidden.shape[0], weight.shape[0], dtype=torch.float32, device=hidden.device)
    if hidden.shape[0]:
        logits_launch(hidden.contiguous(), weight, bias, z, logit_scale, softcap)()
    return z


def forward_launch(hidden, weight, bias, labels, ignore_index: int, logit_scale: float = 1.0, softcap=None,
                   stats: bool = False):
    """(Launch, partials): the launch writing (max, sum of exp, target logit) per row and vocabulary
    slice into ``partials`` (3, rows, splits) float32 -- (6, rows, splits) with ``stats``, the weighted
    logit sum, the logit sum and the maximum before the label after them. hidden (rows, H) contiguous."""
    rows, H = hidden.shape
    V = weight.shape[0]
    constexprs, num_warps = linear_tiles(rows, H, hidden.dtype)
    block_m, block_n = constexprs["BLOCK_M"], constexprs["BLOCK_N"]
    splits = _splits(rows, V, block_m, block_n, hidden.device)
    cols_per_split = triton.cdiv(triton.cdiv(V, block_n), splits) * block_n
    splits = triton.cdiv(V, cols_per_split)
    part = torch.empty(6 if stats else 3, rows, splits, dtype=torch.float32, device=hidden.device)
    transform, has_cap = _transform_args(logit_scale, softcap)
    launch = Launch(
        linear_forward_kernel,
        (triton.cdiv(rows, block_m), splits),
        (hidden, weight, bias if bias is not None else hidden, labels, part,
         rows, V, H, hidden.stride(0), weight.stride(0), cols_per_split, splits, *transform),
        dict(HAS_BIAS=bias is not None, SOFTCAP=has_cap, STATS=stats, **constexprs),
        num_warps,
    )
    return launch, part


def linear_forward(hidden: torch.Tensor, weight, bias, labels: torch.Tensor, ignore_index: int,
                   logit_scale: float = 1.0, softcap=None, stats: bool = False):
    """hidden (rows, H) -> per-token log-probs and log-sum-exps (rows,) float32, and with ``stats`` the
    (rows, STATS) token statistics of the transformed logits; logits stay on chip."""
    rows = hidden.shape[0]
    V = weight.shape[0]
    tok = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    if rows == 0:
        return (tok, tok.clone(), tok.new_zeros(0, STATS)) if stats else (tok, tok.clone())
    launch, part = forward_launch(hidden.contiguous(), weight, bias, labels, ignore_index, logit_scale, softcap, stats)
    launch()
    # Combine the slices' (max, sum) in a fixed order: deterministic, O(rows x splits).
    mx, sm, tgt = part[:3]
    top = mx.max(dim=1).values
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    lse = shift + torch.log((sm * torch.exp(mx - shift[:, None])).sum(dim=1))
    counted = labels != ignore_index
    valid = counted & (labels >= 0) & (labels < V)
    target = tgt.sum(dim=1)
    tok = torch.where(valid, target - lse, torch.full_like(lse, float("nan")))
    tok = torch.where(counted, tok, torch.zeros_like(tok))
    if not stats:
        return tok, lse
    s1, zs, before = part[3:]
    # Each slice's weighted sum is relative to its own maximum: exp(max - lse) puts it on the row's scale.
    expected = (s1 * torch.exp(mx - lse[:, None])).sum(dim=1)
    st = torch.stack([expected, zs.sum(dim=1), top, before.max(dim=1).values, target], dim=1)
    return tok, lse, torch.where(counted[:, None], st, torch.zeros_like(st))
