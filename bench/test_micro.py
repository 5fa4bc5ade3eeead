"""Micro timings with pytest-benchmark: ``pytest bench/ --benchmark-only`` (not part of ``make test``).

Small shapes (N=4, T=256, V=8192 float32) on the CPU; forward + backward of each entry point per backend,
against the eager reference. The benchmark suite (bench.suite) is where the sizes that matter are run.
"""

import pytest
import torch

from safedpo_kernels import available_backends, linear_safedpo_loss, reference, safedpo_loss, sequence_logps

BACKENDS = [b for b in available_backends("cpu") if b != "triton"]  # the interpreter is not timed
N, T, V, H = 4, 256, 8192, 128


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, T, V, generator=g)
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[:, : T // 4] = -100
    hidden = torch.randn(N, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    flags = torch.tensor([True, False])
    return logits, labels, hidden, weight, torch.zeros(N), flags


def _grad_step(fn, *tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]

    def run():
        out = fn(*leaves)
        out = out.loss if hasattr(out, "loss") else out.sum()
        torch.autograd.grad(out, leaves)

    return run


def test_sequence_logps_eager(benchmark, data):
    logits, labels, *_ = data
    benchmark(_grad_step(lambda x: reference.sequence_logps(x, labels), logits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logps(benchmark, data, backend):
    logits, labels, *_ = data
    benchmark(_grad_step(lambda x: sequence_logps(x, labels, backend=backend), logits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_safedpo_loss(benchmark, data, backend):
    logits, labels, _, _, ref, flags = data
    benchmark(_grad_step(lambda x: safedpo_loss(x, labels, ref, flags, ~flags, backend=backend), logits))


def test_linear_eager(benchmark, data):
    _, labels, hidden, weight, ref, flags = data
    benchmark(_grad_step(lambda h, w: reference.safedpo_loss(h @ w.t(), labels, ref, flags, ~flags), hidden, weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_safedpo_loss(benchmark, data, backend):
    _, labels, hidden, weight, ref, flags = data
    benchmark(_grad_step(lambda h, w: linear_safedpo_loss(h, w, labels, ref, flags, ~flags, backend=backend), hidden, weight))
