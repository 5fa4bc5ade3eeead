"""The backend contract: every backend module provides the whole ``Backend`` protocol, and
``available_backends`` / "auto" agree with what can run here."""

import pytest
import torch

from safedpo_kernels import available_backends
from safedpo_kernels.dispatch import Backend, backend_module, resolve_backend

MEMBERS = [name for name in vars(Backend) if not name.startswith("_")]


@pytest.mark.parametrize("name", ["torch", "native", "triton"])
def test_every_backend_implements_the_whole_protocol(name):
    if name not in available_backends("cpu") + available_backends("cuda"):
        pytest.skip(f"{name} is not usable here")
    module = backend_module(name)
    assert isinstance(module, Backend)
    assert set(MEMBERS) == {"logp_forward", "logp_backward", "grad_buffer", "prepare_weight", "linear_logits", "linear_forward",
                            "linear_dlogits", "dlogits_chunk_rows"}
    for member in MEMBERS:
        assert callable(getattr(module, member)), member


def test_grad_buffer_shape_dtype_device(case):
    backend, device = case
    buf = backend_module(backend).grad_buffer((3, 4, 5), torch.bfloat16, torch.device(device))
    assert buf.shape == (3, 4, 5) and buf.dtype == torch.bfloat16 and buf.device.type == device
    assert buf.is_contiguous()


def test_auto_is_the_first_available_backend():
    cpu = available_backends("cpu")
    assert "torch" in cpu and resolve_backend("auto", torch.device("cpu")) == cpu[0]
    assert available_backends("meta") == ["torch"]
    if torch.cuda.is_available():
        assert resolve_backend("auto", torch.device("cuda")) == available_backends("cuda")[0]


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_native_switched_off(monkeypatch, value):
    monkeypatch.setenv("SAFEDPO_NATIVE", value)
    assert "native" not in available_backends("cpu")
    assert resolve_backend("auto", torch.device("cpu")) != "native"
