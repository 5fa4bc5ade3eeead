"""On a GPU (bench/gpu_check.sh runs these): the logits path's validate=False forward and backward never
synchronize with the host, so that a step can be captured in a CUDA graph and replayed; the Triton
kernels launch on their tensors' device, whichever device is current."""

import pytest
import torch

from helpers import TOL, make_flags, make_labels, make_logits, max_scaled_err, rel_err
from safedpo_kernels import available_backends, safedpo_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BACKENDS = available_backends("cuda") if torch.cuda.is_available() else []


def batch(seed, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    B, T, V = 3, 33, 4099
    logits = make_logits((2 * B, T, V), dtype, "cuda", gen)
    labels = make_labels(2 * B, T, V, gen, "cuda")
    ref = torch.randn(2 * B, generator=gen).cuda()
    cs, rs = make_flags(B, gen, "cuda")
    return logits, labels, ref, cs, rs


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_synchronization(backend):
    logits, labels, ref, cs, rs = batch(0)
    x = logits.clone().requires_grad_()
    safedpo_loss(x, labels, ref, cs, rs, backend=backend, validate=False).loss.backward()  # compiles the kernels
    torch.cuda.synchronize()
    x.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = safedpo_loss(x, labels, ref, cs, rs, backend=backend, validate=False)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("inplace", [False, True], ids=["buffer", "inplace"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_captured_step_replays_equal_to_eager(backend, inplace):
    """Forward and backward of safedpo_loss captured once in a CUDA graph, replayed on new data copied into
    its static inputs: the loss and gradient equal an eager step on that data."""
    static = [t.clone() for t in batch(1)]
    logits = static[0].requires_grad_()

    def step():
        out = safedpo_loss(logits, *static[1:], backend=backend, validate=False, inplace_backward=inplace)
        out.loss.backward()
        return out.loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel compilation, allocator) off the capture
        for _ in range(2):
            logits.grad = None
            with torch.no_grad():
                logits.copy_(static[0].detach())
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    logits.grad = None
    with torch.cuda.graph(graph):
        loss = step()
    for seed in (2, 3):
        fresh = batch(seed)
        with torch.no_grad():
            logits.copy_(fresh[0])
        for s, f in zip(static[1:], fresh[1:]):
            s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        x = fresh[0].clone().requires_grad_()
        want = safedpo_loss(x, *fresh[1:], backend=backend)
        want.loss.backward()
        assert max_scaled_err(loss, want.loss) <= TOL[torch.bfloat16][0]
        assert rel_err(logits.grad, x.grad) <= TOL[torch.bfloat16][1]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_launches_on_the_tensors_device():
    logits, labels, ref, cs, rs = (t.to("cuda:1") for t in batch(4))
    with torch.cuda.device(0):
        got = safedpo_loss(logits, labels, ref, cs, rs, backend="triton")
    want = safedpo_loss(logits.cpu().float(), labels.cpu(), ref.cpu(), cs.cpu(), rs.cpu(), backend="torch")
    assert max_scaled_err(got.loss.cpu(), want.loss) <= TOL[torch.bfloat16][0]
