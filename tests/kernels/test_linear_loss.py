"""linear_safedpo_loss with its gradients formed in the forward (3 matmuls), the logit transforms
(logit_scale, softcap) and the sum reduction, on every backend, against float64."""

import pytest
import torch

from helpers import TOL, make_flags, make_labels, max_scaled_err, pack, rel_err
from safedpo_kernels import LinearSafeDPOLoss, linear_safedpo_loss, linear_sequence_logps, reference
from safedpo_kernels.dispatch import backend_module

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(B, T, H, V, dtype, device, seed, bias=True, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=gen).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=gen) * scale / H**0.5).to(dtype).to(device)
    b = (torch.randn(V, generator=gen) * 0.5).to(dtype).to(device) if bias else None
    labels = make_labels(2 * B, T, V, gen, device)
    cs, rs = make_flags(B, gen, device)
    ref = (torch.randn(2 * B, generator=gen) * 3 - 25).to(device)
    return hidden, weight, b, labels, cs, rs, ref


def fused(hidden, weight, bias, labels, ref, cs, rs, grads=(True, True, True), **kw):
    leaves = [None if t is None else t.detach().clone().requires_grad_(g) for t, g in zip((hidden, weight, bias), grads)]
    out = linear_safedpo_loss(leaves[0], leaves[1], labels, ref, cs, rs, bias=leaves[2], **kw)
    out.loss.backward()
    return out, [None if t is None else t.grad for t in leaves]


def oracle(hidden, weight, bias, labels, ref, cs, rs, cu_seqlens=None, logit_scale=1.0, softcap=None, **kw):
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logits = reference.linear_logits(*leaves, logit_scale=logit_scale, softcap=softcap)
    out = reference.safedpo_loss(logits, labels, ref.double(), cs, rs, cu_seqlens=cu_seqlens, **kw)
    out.loss.backward()
    return out, [None if t is None else t.grad for t in leaves]


def check(got, want, dtype):
    (g_out, g_grads), (w_out, w_grads) = got, want
    out_tol, grad_tol = TOL[dtype]
    assert g_out.loss.dtype == torch.float32 and g_out.loss.dim() == 0
    for field in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        assert max_scaled_err(getattr(g_out, field), getattr(w_out, field)) <= out_tol, field
    assert torch.equal(g_out.kept.cpu(), w_out.kept.cpu())
    assert torch.equal(g_out.swapped.cpu(), w_out.swapped.cpu())
    for g, w in zip(g_grads, w_grads):
        if w is not None:
            assert g is not None and g.dtype == dtype
            assert rel_err(g, w) <= grad_tol


TRANSFORMS = [dict(), dict(logit_scale=0.0625), dict(softcap=3.0), dict(logit_scale=1.7, softcap=1.5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("transform", TRANSFORMS, ids=["plain", "scale", "softcap", "scale+softcap"])
def test_matches_float64(case, dtype, bias, transform):
    backend, device = case
    hidden, weight, b, labels, cs, rs, ref = make(3, 7, 37, 203, dtype, device, seed=50, bias=bias)
    kw = dict(beta=0.3, delta=2.0, label_smoothing=0.1, **transform)
    got = fused(hidden, weight, b, labels, ref, cs, rs, backend=backend, **kw)
    want = oracle(hidden, weight, b, labels, ref, cs, rs, **kw)
    check(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("average", [False, True])
def test_packed_reduction_average(case, dtype, reduction, average):
    backend, device = case
    hidden, weight, b, labels, cs, rs, ref = make(3, 6, 19, 151, dtype, device, seed=51)
    packed, packed_labels, cu = pack(hidden, labels, [6, 1, 0, 4, 5, 6])
    kw = dict(beta=0.5, delta=1.0, reduction=reduction, average=average, softcap=4.0)
    got = fused(packed, weight, b, packed_labels, ref, cs, rs, cu_seqlens=cu, backend=backend, **kw)
    want = oracle(packed, weight, b, packed_labels, ref, cs, rs, cu_seqlens=cu, **kw)
    check(got, want, dtype)


def test_softcap_saturated_logits(case):
    """|z0| far beyond the cap: tanh saturates, the logits sit at +-softcap and the derivative 1 - t^2
    underflows to about 0 without NaN, as in float64."""
    backend, device = case
    hidden, weight, b, labels, cs, rs, ref = make(2, 5, 16, 97, torch.float32, device, seed=52, scale=400.0)
    kw = dict(beta=0.1, delta=3.0, softcap=5.0, logit_scale=2.0)
    got = fused(hidden, weight, b, labels, ref, cs, rs, backend=backend, **kw)
    want = oracle(hidden, weight, b, labels, ref, cs, rs, **kw)
    z0 = reference.linear_logits(hidden.double(), weight.double(), b.double())
    assert (z0.abs() > 100).float().mean() > 0.5  # most logits deep in the saturated range
    assert all(torch.isfinite(g).all() for g in got[1])
    check(got, want, torch.float32)


def test_frozen_head_forms_no_weight_gradient(case):
    """LoRA / frozen LM head: weight and bias need no gradient, so none is formed or returned."""
    backend, device = case
    hidden, weight, b, labels, cs, rs, ref = make(2, 6, 24, 99, torch.float32, device, seed=53)
    got = fused(hidden, weight, b, labels, ref, cs, rs, grads=(True, False, False), backend=backend, softcap=2.0)
    assert got[1][1] is None and got[1][2] is None
    want = oracle(hidden, weight, b, labels, ref, cs, rs, softcap=2.0)
    assert max_scaled_err(got[0].loss, want[0].loss) <= 1e-5
    assert rel_err(got[1][0], want[1][0]) <= 1e-5


def test_sum_reduction_accumulates_like_one_batch(case):
    """Two calls with reduction="sum", divided by the kept pairs of both, give one call's mean."""
    backend, device = case
    hidden, weight, b, labels, cs, rs, ref = make(4, 6, 20, 101, torch.float32, device, seed=54)
    kept = int((cs | rs).sum())
    w1 = weight.clone().requires_grad_()
    halves = []
    for sl in (slice(0, 2), slice(2, 4)):
        rows = torch.cat([torch.arange(4)[sl], 4 + torch.arange(4)[sl]]).to(device)
        out = linear_safedpo_loss(hidden[rows], w1, labels[rows], ref[rows], cs[sl], rs[sl], bias=b,
                                  reduction="sum", backend=backend)
        (out.loss / kept).backward()
        halves.append(out.loss.detach())
    w2 = weight.clone().requires_grad_()
    whole = linear_safedpo_loss(hidden, w2, labels, ref, cs, rs, bias=b, backend=backend)
    whole.loss.backward()
    assert max_scaled_err(sum(halves) / kept, whole.loss.detach()) <= 1e-6
    assert rel_err(w1.grad, w2.grad) <= 1e-6


def test_deterministic_and_inputs_untouched(case):
    backend, device = case
    hidden, weight, b, labels, cs, rs, ref = make(3, 7, 33, 141, torch.bfloat16, device, seed=55)
    saved = [t.clone() for t in (hidden, weight, b, labels, ref)]
    one = fused(hidden, weight, b, labels, ref, cs, rs, backend=backend, softcap=3.0)
    two = fused(hidden, weight, b, labels, ref, cs, rs, backend=backend, softcap=3.0)
    assert torch.equal(one[0].loss, two[0].loss)
    assert all(torch.equal(x, y) for x, y in zip(one[1], two[1]))
    for before, after in zip(saved, (hidden, weight, b, labels, ref)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("budget", ["small", "one-pair-too-big"])
def test_chunking_and_two_pass_give_the_same_result(case, monkeypatch, budget):
    """Chunks of a few pairs, and pairs too large for any chunk (two passes), equal one big chunk."""
    backend, device = case
    hidden, weight, b, labels, cs, rs, ref = make(4, 9, 16, 113, torch.float32, device, seed=56)
    kw = dict(backend=backend, softcap=3.0, logit_scale=0.8)
    whole = fused(hidden, weight, b, labels, ref, cs, rs, **kw)
    rows = 12 if budget == "small" else 2  # float32 rows of V = 113
    monkeypatch.setenv("SAFEDPO_LINEAR_CHUNK_BYTES", str(rows * 4 * 113))
    chunked = fused(hidden, weight, b, labels, ref, cs, rs, **kw)
    assert max_scaled_err(chunked[0].loss, whole[0].loss) <= 1e-6
    for x, y in zip(chunked[1], whole[1]):
        assert rel_err(x, y) <= 1e-5


def test_three_matmuls_and_a_backward_without_any(monkeypatch):
    """The logits are formed once per chunk in forward and never recomputed; backward does no matmul."""
    module = backend_module("torch")
    calls = {"linear_logits": 0, "linear_forward": 0, "linear_dlogits": 0, "mm": 0}
    for name in ("linear_logits", "linear_forward", "linear_dlogits"):
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    hidden, weight, b, labels, cs, rs, ref = make(4, 8, 16, 97, torch.float32, "cpu", seed=57)
    monkeypatch.setenv("SAFEDPO_LINEAR_CHUNK_BYTES", str(14 * 4 * 97))  # a few pairs per chunk
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_safedpo_loss(h, w, labels, ref, cs, rs, bias=b, backend="torch")
    chunks = calls["linear_logits"]
    assert chunks >= 2 and calls["linear_forward"] == 0 and calls["linear_dlogits"] == 0
    with torch.profiler.profile() as prof:
        out.loss.backward()
    assert not [e.name for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear")]
    assert calls["linear_logits"] == chunks and h.grad is not None and w.grad is not None


def test_no_gradient_buffers_under_no_grad(monkeypatch):
    """Under torch.no_grad the (V, H) float32 d weight buffer (and d hidden) are never allocated."""
    from bench.memory import profiled_peak_bytes

    V, H = 20000, 256
    hidden, weight, b, labels, cs, rs, ref = make(2, 8, H, V, torch.float32, "cpu", seed=58, bias=False)
    monkeypatch.setenv("SAFEDPO_LINEAR_CHUNK_BYTES", str(8 * 4 * V))
    dw_bytes = V * H * 4
    w = weight.clone().requires_grad_()

    def under_no_grad():
        with torch.no_grad():
            linear_safedpo_loss(hidden, w, labels, ref, cs, rs, backend="torch")

    def with_grad():
        linear_safedpo_loss(hidden, w, labels, ref, cs, rs, backend="torch").loss.backward()

    assert profiled_peak_bytes(under_no_grad) < dw_bytes / 2
    assert profiled_peak_bytes(with_grad) >= dw_bytes  # the measurement does see the buffer


def test_second_backward_raises(case):
    backend, device = case
    hidden, weight, b, labels, cs, rs, ref = make(2, 5, 16, 61, torch.float32, device, seed=59)
    h = hidden.clone().requires_grad_()
    out = linear_safedpo_loss(h, weight, labels, ref, cs, rs, backend=backend)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.loss.backward()


def test_upstream_gradient_scales(case):
    backend, device = case
    hidden, weight, b, labels, cs, rs, ref = make(2, 5, 16, 61, torch.float32, device, seed=60)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    linear_safedpo_loss(h1, weight, labels, ref, cs, rs, backend=backend).loss.backward()
    (linear_safedpo_loss(h2, weight, labels, ref, cs, rs, backend=backend).loss * -2.5).backward()
    assert rel_err(h2.grad, -2.5 * h1.grad) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("transform", TRANSFORMS[1:], ids=["scale", "softcap", "scale+softcap"])
def test_sequence_logps_transforms(case, dtype, transform):
    """The recompute path (linear_sequence_logps) with the same transforms."""
    backend, device = case
    hidden, weight, b, labels, *_ = make(2, 6, 21, 87, dtype, device, seed=61)
    upstream = torch.randn(4).to(device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    got = linear_sequence_logps(leaves[0], leaves[1], labels, bias=leaves[2], backend=backend, **transform)
    (got * upstream).sum().backward()
    doubles = [t.double().requires_grad_() for t in (hidden, weight, b)]
    want = reference.sequence_logps(reference.linear_logits(*doubles, **transform), labels)
    (want * upstream.double()).sum().backward()
    assert max_scaled_err(got, want) <= TOL[dtype][0]
    for leaf, d in zip(leaves, doubles):
        assert rel_err(leaf.grad, d.grad) <= TOL[dtype][1]


@pytest.mark.parametrize("bad", [dict(softcap=0.0), dict(softcap=-1.0), dict(softcap=float("nan")),
                                 dict(logit_scale=0.0), dict(logit_scale=-2.0), dict(logit_scale=float("inf")),
                                 dict(reduction="none"), dict(softcap="30")])
def test_bad_transform_or_reduction_is_named(bad):
    hidden, weight, b, labels, cs, rs, ref = make(2, 4, 8, 30, torch.float32, "cpu", seed=62)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        linear_safedpo_loss(hidden, weight, labels, ref, cs, rs, **bad)
    with pytest.raises(ValueError, match=name):
        LinearSafeDPOLoss(**bad)
    if name != "reduction":
        with pytest.raises(ValueError, match=name):
            linear_sequence_logps(hidden, weight, labels, **bad)
