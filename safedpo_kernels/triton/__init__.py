"""Triton backend (backend "triton"): one module per kernel, each with its launcher beside it.

    logprob_forward.py        logits path forward: per-token log-sum-exp and target log-prob
    logprob_backward.py       logits path backward: g * (onehot - softmax), optionally in place
    fused_linear_forward.py   fused-linear forward: logits tiles on chip, (max, sum, target) per slice;
                              and the float32 logits of a chunk (the gradient-in-forward loss's GEMM)
    fused_linear_backward.py  fused-linear backward: d logits of a chunk of rows, logits recomputed
    _utils.py                 the online log-sum-exp step shared by both forwards; the Launch record

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI checks the kernels).
The environment variable must be set before this module is first imported: Triton decides between
compiling and interpreting when the kernels are defined. ``bench.gpu_compile`` compiles every launch
these launchers choose for sm_80 and sm_90 on a machine without a GPU.
"""

from __future__ import annotations

import functools

import numpy
import torch
import triton

from .._env import major_minor
from ._utils import INTERPRETED
from .fused_linear_backward import dlogits_chunk_rows, linear_dlogits
from .fused_linear_forward import linear_forward, linear_logits, prepare_weight
from .logprob_backward import logp_backward
from .logprob_forward import logp_forward

__all__ = [
    "INTERPRETED", "check_device", "interpreter_problem", "logp_forward", "logp_backward", "grad_buffer",
    "prepare_weight", "linear_logits", "linear_forward", "linear_dlogits", "dlogits_chunk_rows",
]


def grad_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The backward's output buffer: every element is written by the kernel, so it starts empty."""
    return torch.empty(shape, dtype=dtype, device=device)


def check_device(device: torch.device) -> None:
    """RuntimeError when the kernels cannot run on tensors of this device."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and INTERPRETED:
        problem = interpreter_problem(triton.__version__, numpy.__version__)
        if problem:
            raise RuntimeError(problem)
        return
    if device.type == "cpu":
        raise RuntimeError(
            "backend='triton' needs CUDA tensors; CPU tensors run only under the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing safedpo_kernels). Use backend='torch' or 'auto' on the CPU."
        )
    raise RuntimeError(f"backend='triton' does not support {device.type} tensors; use backend='torch'")


@functools.lru_cache(maxsize=None)
def interpreter_problem(triton_version: str, numpy_version: str) -> str:
    """Why the Triton interpreter of these versions cannot run the kernels, or "" when it can.

    Triton's interpreter before 3.7 turns a loop bound held in a 1-element array into an int with
    int(array), which NumPy 2.4 made an error: every kernel with a runtime-sized loop then fails with
    "only 0-dimensional arrays can be converted to Python scalars" (triton-lang/triton#9171; seen with
    triton 3.6.0 and numpy 2.4.6). Compiled kernels on a GPU are not affected."""
    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"the Triton interpreter (TRITON_INTERPRET=1) of triton {triton_version} cannot run with numpy "
                f"{numpy_version}: it fails inside every kernel loop (triton-lang/triton#9171). Install "
                f"'numpy<2.4' or 'triton>=3.7', or use backend='torch' or 'native' on the CPU.")
    return ""
