"""Fused-linear entry points against float64 hidden @ weight.T + bias."""

import pytest
import torch

from helpers import TOL, make_flags, make_labels, max_scaled_err, pack, rel_err
from safedpo_kernels import (
    LinearSafeDPOLoss,
    linear_safedpo_loss,
    linear_sequence_logps,
    reference,
    sequence_logps,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(N, T, H, V, dtype, device, seed, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=gen).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=gen) * 2.0 / H**0.5).to(dtype).to(device)
    b = (torch.randn(V, generator=gen) * 0.5).to(dtype).to(device) if bias else None
    labels = make_labels(N, T, V, gen, device)
    return hidden, weight, b, labels, gen


def grads_of(fn, tensors):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    loss = out.loss if hasattr(out, "loss") else out
    loss.backward()
    return out, [None if t is None else t.grad for t in leaves]


def check_grads(got, want, dtype):
    for g, w in zip(got, want):
        if w is not None:
            assert g.dtype == dtype
            assert rel_err(g, w) <= TOL[dtype][1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("average", [False, True])
def test_loss_matches_float64(case, dtype, bias, average):
    backend, device = case
    B, T, H, V = 3, 7, 37, 203
    hidden, weight, b, labels, gen = make(2 * B, T, H, V, dtype, device, seed=20, bias=bias)
    cs, rs = make_flags(B, gen, device)
    logits64 = reference.linear_logits(hidden.double(), weight.double(), None if b is None else b.double())
    ref_logps = reference.sequence_logps(logits64, labels, average=average)
    ref_logps = (ref_logps + torch.randn(2 * B, generator=gen).to(device)).float()
    kw = dict(beta=0.4, delta=2.0, label_smoothing=0.1, average=average)

    got, g_grads = grads_of(
        lambda h, w, bb: linear_safedpo_loss(h, w, labels, ref_logps, cs, rs, bias=bb, backend=backend, **kw),
        [hidden, weight, b],
    )
    want, w_grads = grads_of(
        lambda h, w, bb: reference.safedpo_loss(reference.linear_logits(h, w, bb), labels, ref_logps.double(), cs, rs, **kw),
        [hidden.double(), weight.double(), None if b is None else b.double()],
    )
    assert got.loss.dtype == torch.float32
    assert max_scaled_err(got.loss, want.loss) <= TOL[dtype][0]
    for field in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        assert max_scaled_err(getattr(got, field), getattr(want, field)) <= TOL[dtype][0]
        assert not getattr(got, field).requires_grad, f"{field}: the metrics carry no gradient"
    assert torch.equal(got.kept.cpu(), want.kept.cpu())
    assert torch.equal(got.swapped.cpu(), want.swapped.cpu())
    check_grads(g_grads, w_grads, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_sequence_logps_match_float64(case, dtype):
    backend, device = case
    N, T, H, V = 4, 6, 19, 151
    hidden, weight, b, labels, gen = make(N, T, H, V, dtype, device, seed=21)
    packed, packed_labels, cu = pack(hidden, labels, [6, 1, 0, 4])
    upstream = torch.randn(N, generator=gen).to(device)
    got, g_grads = grads_of(
        lambda h, w, bb: (linear_sequence_logps(h, w, packed_labels, bias=bb, cu_seqlens=cu, backend=backend) * upstream).sum(),
        [packed, weight, b],
    )
    want, w_grads = grads_of(
        lambda h, w, bb: (reference.sequence_logps(reference.linear_logits(h, w, bb), packed_labels, cu_seqlens=cu)
                          * upstream.double()).sum(),
        [packed.double(), weight.double(), b.double()],
    )
    assert max_scaled_err(got, want) <= TOL[dtype][0]
    check_grads(g_grads, w_grads, dtype)


def test_same_as_logits_path(case):
    """linear_sequence_logps(h, W) == sequence_logps(h @ W.T) on a shifted, non-contiguous hidden."""
    backend, device = case
    N, T, H, V = 3, 8, 24, 99
    hidden, weight, b, labels, _ = make(N, T + 1, H, V, torch.float32, device, seed=22)
    view, labels = hidden[:, 1:], labels[:, 1:]
    a = linear_sequence_logps(view, weight, labels, bias=b, backend=backend)
    logits = reference.linear_logits(view.double(), weight.double(), b.double()).float()
    c = sequence_logps(logits, labels, backend=backend)
    assert max_scaled_err(a, c) <= 1e-5


@pytest.mark.parametrize("h_dtype, w_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float32)], ids=str)
def test_a_head_in_another_dtype_than_hidden(case, h_dtype, w_dtype):
    """Outside autocast hidden and the head may differ in dtype (docs/api.md): the result is float64's on
    the values as the backend multiplies them -- as given, in float32, on the CPU; the head rounded once to
    16-bit hidden states' dtype where tensor cores multiply (Triton, CUDA) -- and each gradient comes back
    in its own input's dtype."""
    backend, device = case
    N, T, H, V = 4, 5, 24, 77
    hidden, weight, b, labels, gen = make(N, T, H, V, h_dtype, device, seed=23)
    # drawn anew in float32: values a 16-bit copy does not hold
    weight = (torch.randn(V, H, generator=gen) * 4.0 / H**0.5).to(w_dtype).to(device)
    b = torch.randn(V, generator=gen).to(w_dtype).to(device)
    rounded = h_dtype != torch.float32 and (backend == "triton" or device == "cuda")
    as_multiplied = weight.to(h_dtype).to(w_dtype) if rounded else weight
    upstream = torch.randn(N, generator=gen).to(device)
    got, g_grads = grads_of(lambda h, w, bb: linear_sequence_logps(h, w, labels, bias=bb, backend=backend) @ upstream,
                            [hidden, weight, b])
    want, w_grads = grads_of(
        lambda h, w, bb: reference.sequence_logps(reference.linear_logits(h, w, bb), labels) @ upstream.double(),
        [hidden.double(), as_multiplied.double(), b.double()])
    rows = linear_sequence_logps(hidden, weight, labels, bias=b, backend=backend)
    want_rows = reference.sequence_logps(reference.linear_logits(hidden.double(), as_multiplied.double(), b.double()), labels)
    assert max_scaled_err(rows, want_rows) <= 1e-4 and max_scaled_err(got, want) <= 1e-4
    for g, w, like in zip(g_grads, w_grads, (hidden, weight, b)):
        assert g.dtype == like.dtype
        assert rel_err(g, w) <= 1e-2


def test_frozen_head_and_module(case):
    backend, device = case
    B, T, H, V = 2, 5, 16, 77
    hidden, weight, _, labels, gen = make(2 * B, T, H, V, torch.float32, device, seed=23, bias=False)
    cs, rs = make_flags(B, gen, device)
    ref_logps = torch.randn(2 * B, generator=gen).to(device) - 20
    h = hidden.clone().requires_grad_()
    out = LinearSafeDPOLoss(beta=0.2, delta=3.0, backend=backend)(h, weight, labels, ref_logps, cs, rs)
    out.loss.backward()
    assert weight.grad is None and not weight.requires_grad
    hd = hidden.double().requires_grad_()
    want = reference.safedpo_loss(hd @ weight.double().t(), labels, ref_logps.double(), cs, rs, beta=0.2, delta=3.0)
    want.loss.backward()
    assert max_scaled_err(out.loss, want.loss) <= 1e-5
    assert rel_err(h.grad, hd.grad) <= 1e-5


def test_tied_embedding_weight(case):
    """The LM head tied to the input embedding: both uses contribute to one gradient."""
    backend, device = case
    N, T, H, V = 4, 6, 12, 50
    gen = torch.Generator().manual_seed(24)
    ids = torch.randint(0, V, (N, T), generator=gen).to(device)
    labels = make_labels(N, T, V, gen, device)
    emb = torch.randn(V, H, generator=gen).to(device)
    mix = torch.randn(H, H, generator=gen).to(device) / H**0.5

    def run(weight, fn):
        hidden = torch.tanh(weight[ids] @ mix)
        return fn(hidden, weight)

    w = emb.clone().requires_grad_()
    run(w, lambda h, W: linear_sequence_logps(h, W, labels, backend=backend).sum()).backward()
    wd = emb.double().requires_grad_()
    mix = mix.double()
    run(wd, lambda h, W: reference.sequence_logps(h @ W.t(), labels).sum()).backward()
    assert rel_err(w.grad, wd.grad) <= 1e-5


def test_deterministic_and_inputs_untouched(case):
    backend, device = case
    N, T, H, V = 4, 7, 33, 141
    hidden, weight, b, labels, gen = make(N, T, H, V, torch.bfloat16, device, seed=25)
    saved = [t.clone() for t in (hidden, weight, b, labels)]
    upstream = torch.randn(N, generator=gen).to(device)

    def once():
        return grads_of(lambda h, w, bb: (linear_sequence_logps(h, w, labels, bias=bb, backend=backend) * upstream).sum(),
                        [hidden, weight, b])

    (o1, g1), (o2, g2) = once(), once()
    assert torch.equal(o1, o2) and all(torch.equal(x, y) for x, y in zip(g1, g2))
    for before, after in zip(saved, (hidden, weight, b, labels)):
        assert torch.equal(before, after)


def test_reference_helper_under_no_grad(case):
    backend, device = case
    N, T, H, V = 4, 5, 20, 64
    hidden, weight, b, labels, _ = make(N, T, H, V, torch.float32, device, seed=26)
    with torch.no_grad():
        got = linear_sequence_logps(hidden, weight.requires_grad_(), labels, bias=b, backend=backend)
    assert not got.requires_grad
    want = reference.sequence_logps(reference.linear_logits(hidden.double(), weight.double(), b.double()), labels)
    assert max_scaled_err(got, want) <= 1e-5


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (dict(weight=torch.zeros(50, 9)), ValueError, ["weight", "H = 8"]),
        (dict(weight=torch.zeros(50)), ValueError, ["weight", "2-D"]),
        (dict(weight=torch.zeros(50, 8, dtype=torch.long)), TypeError, ["weight"]),
        (dict(bias=torch.zeros(49)), ValueError, ["bias", "(50,)"]),
        (dict(bias=torch.zeros(50, dtype=torch.long)), TypeError, ["bias"]),
        (dict(hidden=torch.zeros(4, 5, 8, dtype=torch.long)), TypeError, ["hidden"]),
        (dict(hidden=torch.zeros(4, 6, 8)), ValueError, ["labels"]),
        (dict(bias=torch.zeros(50, device="meta")), ValueError, ["bias", "device"]),
        (dict(labels=torch.full((4, 5), 50)), ValueError, ["labels", "outside [0, 50)"]),
    ],
)
def test_bad_input(change, exc, words):
    args = dict(hidden=torch.zeros(4, 5, 8), weight=torch.zeros(50, 8), labels=torch.zeros(4, 5, dtype=torch.long), bias=None)
    args.update(change)
    with pytest.raises(exc) as info:
        linear_safedpo_loss(
            args["hidden"], args["weight"], args["labels"], torch.zeros(4), torch.ones(2), torch.ones(2), bias=args["bias"]
        )
    for w in words:
        assert w in str(info.value)


def test_torch_backend_peak_memory_under_quarter_of_logits():
    """Peak bytes from torch.profiler allocation events (deterministic byte counts, see
    bench.memory.profiled_peak_bytes) for forward + backward at N*T = 4096 tokens, V = 32000, H = 64."""
    from bench.memory import profiled_peak_bytes

    N, T, H, V = 4, 1024, 64, 32000
    gen = torch.Generator().manual_seed(27)
    hidden = torch.randn(N, T, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / 8).requires_grad_()
    labels = torch.randint(0, V, (N, T), generator=gen)
    logits_bytes = N * T * V * 4

    def step():
        linear_sequence_logps(hidden, weight, labels, backend="torch").sum().backward()

    peak = profiled_peak_bytes(step)
    assert hidden.grad is not None and weight.grad is not None
    assert 0 < peak < logits_bytes / 4, f"peak {peak / 2**20:.1f} MiB vs logits {logits_bytes / 2**20:.1f} MiB"

    def eager():
        (hidden @ weight.t()).log_softmax(-1).gather(-1, labels.unsqueeze(-1)).sum().backward()

    # The measurement does see V-sized allocations: eager's peak is several logits' worth.
    assert profiled_peak_bytes(eager) > 2 * logits_bytes
