"""What every op module shares: first-order backward formulas, autocast switched off inside the
kernels (and autocast's dtype for the LM head's operands), and the placeholders an op returns where
autograd expects nothing."""

from __future__ import annotations

import contextlib
import functools

import torch


def first_order_only(backward):
    """The kernels' backward passes are first-order: under create_graph=True (a second derivative on the
    way) raise a clear error at once, rather than return gradients without a graph."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "safedpo_kernels computes first-order gradients only: backward with create_graph=True (for second "
                "derivatives) is not supported"
            )
        return backward(ctx, *grads)

    return wrapper


def no_second_order(name: str):
    """The autograd formula of a backward op: its inputs are a backward's, and their derivatives (second
    derivatives of the loss) are not supported."""

    def backward(ctx, *grads):
        raise RuntimeError(f"safedpo_kernels computes first-order gradients only: {name} cannot be differentiated "
                           "(backward with create_graph=True, or torch.func transforms of a backward)")

    return backward


@contextlib.contextmanager
def no_autocast():
    """Autocast switched off while a kernel runs. The kernels take their inputs in the dtypes they come
    in and choose their own precision (float32 logits and accumulation); under an ambient autocast (a
    trainer's bf16 mixed precision) the chunked matmuls of the CPU backends would otherwise produce
    bfloat16 logits, which moves a log-prob by ~|z| / 256 per token."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if _autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _autocast_enabled(device: str) -> bool:
    try:
        return torch.is_autocast_enabled(device)
    except TypeError:  # torch without the device_type argument
        return torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()


def autocast_operands(*tensors):
    """Inside torch.autocast, the LM head's matmul operands (hidden, weight, bias) in autocast's dtype,
    as autocast would hand them to F.linear -- differentiably, so a float32 weight still gets a float32
    gradient; outside it, or for a device autocast does not cover, the tensors unchanged. The kernels
    then keep the logits in float32, where autocast would have rounded them."""
    device = tensors[0].device.type
    if device not in ("cpu", "cuda") or not _autocast_enabled(device):
        return tensors
    try:
        dtype = torch.get_autocast_dtype(device)
    except AttributeError:  # older torch
        dtype = torch.get_autocast_cpu_dtype() if device == "cpu" else torch.get_autocast_gpu_dtype()
    return tuple(t if t is None or t.dtype in (dtype, torch.float64) else t.to(dtype) for t in tensors)


def nones(ctx, given: int) -> tuple:
    """None for the op's other inputs: as many as the call passed (the dispatcher drops trailing
    arguments equal to their defaults, such as the group names of a single-process call)."""
    return (None,) * (len(ctx.needs_input_grad) - given)


def no_grad_slot(like: torch.Tensor) -> torch.Tensor:
    """What an op returns for a gradient nobody asked for: an empty tensor (ops cannot return None)."""
    return like.new_empty(0)


def specs(*tensors) -> tuple:
    return tuple(None if t is None else (t.shape, t.dtype) for t in tensors)
