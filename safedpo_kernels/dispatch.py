"""Which backend computes a call: the backend contract, the backends usable here, and "auto".

A backend is a module (``torch_chunked``, ``native``, ``triton``) that provides every function of the
``Backend`` protocol below. The autograd Functions call only these, so they hold no per-backend or
per-device branches; a new backend is a new module that implements the protocol.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import List, Optional, Protocol, Tuple, runtime_checkable

import torch

from ._env import env_flag
from ._layout import Layout

BACKENDS = ("auto", "triton", "native", "torch")
_MODULES = {"triton": ".triton", "native": ".native", "torch": ".torch_chunked"}


@runtime_checkable
class Backend(Protocol):
    """What every backend module provides (all tensors on one device; float32 statistics).

    Logits path, token rows r addressed through ``layout`` (see ``_layout.Layout``):
        logp_forward(logits, labels, layout, ignore_index) -> (tok, lse): per-token log-prob (0 where
            ignored, NaN for an out-of-range label) and log-sum-exp, both (rows,) float32.
        logp_backward(logits, labels, lse, g_tok, grad, layout, ignore_index, softcap=None) -> None:
            writes g_tok[r] * (onehot(label) - softmax(logits[r])) into ``grad`` (logits' shape; may be
            ``logits`` itself, for the in-place backward, or of another dtype), times the softcap
            derivative 1 - (logits / softcap)^2 when softcap is set. Rows with g_tok == 0 get exact zeros.
        grad_buffer(shape, dtype, device) -> Tensor: the buffer that backward fills (contents undefined).
    Fused-linear path, on the counted rows only (hidden (rows, H), labels (rows,) int64), with the logit
    transform z = softcap * tanh(logit_scale * z0 / softcap) (or logit_scale * z0), z0 = hidden @ W.T + b:
        prepare_weight(weight, bias, hidden_dtype) -> (weight, bias) as the functions below read them;
            their dtype is the one the gradient matmuls run in.
        linear_logits(hidden, weight, bias, logit_scale, softcap) -> (rows, V) float32 transformed logits.
        linear_forward(hidden, weight, bias, labels, ignore_index, logit_scale, softcap) -> (tok, lse), as
            logp_forward, without keeping the logits.
        linear_dlogits(hidden, weight, bias, labels, lse, g, ignore_index, logit_scale, softcap) -> (rows, V)
            d loss / d z0 in the weight's dtype, logits recomputed.
        dlogits_chunk_rows(V, dtype, device) -> int: rows per linear_dlogits call (bounds its buffer).
    """

    def logp_forward(self, logits: torch.Tensor, labels: torch.Tensor, layout: Layout,
                     ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]: ...

    def logp_backward(self, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, g_tok: torch.Tensor,
                      grad: torch.Tensor, layout: Layout, ignore_index: int, softcap: Optional[float] = None) -> None: ...

    def grad_buffer(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor: ...

    def prepare_weight(self, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       hidden_dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]: ...

    def linear_logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      logit_scale: float, softcap: Optional[float]) -> torch.Tensor: ...

    def linear_forward(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       labels: torch.Tensor, ignore_index: int, logit_scale: float,
                       softcap: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]: ...

    def linear_dlogits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       labels: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, ignore_index: int,
                       logit_scale: float, softcap: Optional[float]) -> torch.Tensor: ...

    def dlogits_chunk_rows(self, V: int, dtype: torch.dtype, device: torch.device) -> int: ...


def native_available() -> bool:
    """True when the C++ CPU kernels (backend "native") can be used in this process."""
    if not env_flag("SAFEDPO_NATIVE", True):
        return False
    from . import native

    return native.available()


def triton_available() -> bool:
    """True when the triton package is installed (it runs on CUDA, or on the CPU when interpreted)."""
    return importlib.util.find_spec("triton") is not None


def available_backends(device="cpu") -> List[str]:
    """The concrete backends that can run tensors on ``device`` in this process, "auto"'s pick first.

    CPU: "native" (when the C++ extension builds), "torch", and "triton" only under the Triton
    interpreter (TRITON_INTERPRET=1, how the tests run the kernels). CUDA: "triton" (when installed),
    "torch". Other devices: "torch".
    """
    device = torch.device(device)
    if device.type == "cuda":
        return (["triton"] if triton_available() else []) + ["torch"]
    if device.type != "cpu":
        return ["torch"]
    names = (["native"] if native_available() else []) + ["torch"]
    if triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    return names


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``; a clear error when ``backend`` cannot run there.

    A compiled step calls it while tracing (it reads the environment, loads the C++ kernels) and keeps
    its answer: the backend is fixed for the compiled graph, as the device is."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return available_backends(device)[0]
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install 'triton>=3.3'")
        backend_module("triton").check_device(device)
    elif backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors, got {device.type} tensors")
        if not native_available():
            raise RuntimeError(
                "backend='native' is not available (no C++ compiler, a failed build, or SAFEDPO_NATIVE=0); "
                "use backend='torch' or 'auto'"
            )
    return backend


def backend_module(name: str) -> Backend:
    """The module implementing the ``Backend`` protocol for a concrete backend name."""
    return importlib.import_module(_MODULES[name], __package__)
