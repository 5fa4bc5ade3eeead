"""Strided (non-contiguous) inputs on every backend: the same values and gradients as contiguous ones.

A kernel that indexes a tensor as if it were contiguous reads the wrong elements and gives a plausible,
silently wrong number (labels[:, ::2] once moved Triton's log-probs by 5 nats). Every tensor argument is
passed here as a strided view -- labels, logits, hidden, weight, bias, ref_logps, the safety flags and
cu_seqlens -- and checked against the float64 reference of the same values, gradients included.
"""

import pytest
import torch

from helpers import (
    TOL,
    float64_logps_and_grad,
    logps_and_grad,
    make_flags,
    make_labels,
    make_logits,
    max_scaled_err,
    random_case,
    rel_err,
)
from safedpo_kernels import linear_safedpo_loss, linear_sequence_logps, reference, safedpo_loss, sequence_logps


def every_other(x: torch.Tensor, dim: int) -> torch.Tensor:
    """A view of x's values whose memory interleaves them with garbage along ``dim``."""
    shape = list(x.shape)
    shape[dim] *= 2
    wide = torch.full(shape, 12345, dtype=x.dtype, device=x.device) if not x.is_floating_point() else \
        torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)
    index = [slice(None)] * x.dim()
    index[dim] = slice(0, None, 2)
    wide[tuple(index)] = x
    view = wide[tuple(index)]
    assert not view.is_contiguous() and torch.equal(view, x)
    return view


def transposed_copy(x: torch.Tensor) -> torch.Tensor:
    """The values of an (N, T, ...) tensor stored as (T, N, ...): strides (s1, s0, ...)."""
    view = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not view.is_contiguous() and torch.equal(view, x)
    return view


LABEL_VIEWS = {
    "labels[:, ::2]": lambda lab: every_other(lab, 1),
    "labels.T.T": transposed_copy,
    "labels[::2]": lambda lab: every_other(lab, 0),
}
LOGIT_VIEWS = {
    "contiguous": lambda x: x,
    "logits[..., ::2]": lambda x: every_other(x, 2),  # the vocabulary itself strided
    "logits.T.T": transposed_copy,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("label_view", list(LABEL_VIEWS), ids=list(LABEL_VIEWS))
@pytest.mark.parametrize("logit_view", list(LOGIT_VIEWS), ids=list(LOGIT_VIEWS))
def test_sequence_logps_padded(case, dtype, label_view, logit_view):
    backend, device = case
    N, T, V = 3, 6, 131
    logits, labels, upstream = random_case(N, T, V, dtype, device, seed=41)
    want = float64_logps_and_grad(logits, labels, upstream)
    got = logps_and_grad(LOGIT_VIEWS[logit_view](logits), LABEL_VIEWS[label_view](labels), upstream, backend=backend)
    assert max_scaled_err(got[0], want[0]) <= TOL[dtype][0]
    assert rel_err(got[1], want[1]) <= TOL[dtype][1]


def test_sequence_logps_single_row_strided_labels(case):
    """N = 1: labels[:, ::2] flattens to a strided 1-D *view* (no copy), the case that went wrong."""
    backend, device = case
    gen = torch.Generator().manual_seed(42)
    logits = make_logits((1, 9, 77), torch.float32, device, gen)
    labels = make_labels(1, 9, 77, gen, device)
    strided = every_other(labels, 1)
    assert strided.reshape(-1).stride() == (2,)
    upstream = torch.ones(1, device=device)
    want = float64_logps_and_grad(logits, labels, upstream)
    got = logps_and_grad(logits, strided, upstream, backend=backend)
    assert max_scaled_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sequence_logps_packed(case, dtype):
    backend, device = case
    gen = torch.Generator().manual_seed(43)
    total, V = 17, 149
    logits = make_logits((total, V), dtype, device, gen)
    labels = torch.randint(0, V, (total,), generator=gen).to(device)
    labels[[0, 5, 6]] = -100
    cu = torch.tensor([0, 4, 4, 11, 17], dtype=torch.int32, device=device)
    upstream = torch.randn(4, generator=gen).to(device)
    want = float64_logps_and_grad(logits, labels, upstream, cu_seqlens=cu)
    for x in (every_other(logits, 0), every_other(logits, 1)):
        got = logps_and_grad(x, every_other(labels, 0), upstream, cu_seqlens=every_other(cu, 0), backend=backend)
        assert max_scaled_err(got[0], want[0]) <= TOL[dtype][0]
        assert rel_err(got[1], want[1]) <= TOL[dtype][1]


def test_inplace_backward_into_strided_logits(case):
    """In place on logits whose vocabulary is strided: the gradient lands in those very elements."""
    backend, device = case
    N, T, V = 2, 5, 97
    logits, labels, upstream = random_case(N, T, V, torch.float32, device, seed=44)
    want = float64_logps_and_grad(logits, labels, upstream)
    leaf = every_other(logits, 2).detach().requires_grad_()
    work = leaf * 1
    out = sequence_logps(work, every_other(labels, 1), inplace_backward=True, backend=backend)
    (out * upstream).sum().backward()
    assert max_scaled_err(out.detach(), want[0]) <= 1e-5
    assert rel_err(leaf.grad, want[1]) <= 1e-5


def test_safedpo_loss_strided_everything(case):
    backend, device = case
    gen = torch.Generator().manual_seed(45)
    B, T, V = 4, 7, 113
    logits = make_logits((2 * B, T, V), torch.float32, device, gen, scale=2.0)
    labels = make_labels(2 * B, T, V, gen, device)
    ref = (reference.sequence_logps(logits.double(), labels) + torch.randn(2 * B, generator=gen).to(device)).float()
    cs, rs = make_flags(B, gen, device)
    kw = dict(beta=0.3, delta=2.0, label_smoothing=0.1)

    x = transposed_copy(logits).detach().requires_grad_()
    got = safedpo_loss(x, every_other(labels, 1), every_other(ref, 0), every_other(cs, 0), every_other(rs, 0), backend=backend,
                       **kw)
    got.loss.backward()
    xd = logits.double().requires_grad_()
    want = reference.safedpo_loss(xd, labels, ref.double(), cs, rs, **kw)
    want.loss.backward()
    for field in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        assert max_scaled_err(getattr(got, field), getattr(want, field)) <= 1e-5, field
    assert torch.equal(got.kept.cpu(), want.kept.cpu())
    assert rel_err(x.grad, xd.grad) <= 1e-5


HIDDEN_VIEWS = {
    "hidden[..., ::2]": lambda h: every_other(h, 2),
    "hidden.T.T": transposed_copy,
}
WEIGHT_VIEWS = {
    "weight.T.T": lambda w: w.t().contiguous().t(),  # column-major: stride (1, V)
    "weight[::2]": lambda w: every_other(w, 0),
    "weight[:, ::2]": lambda w: every_other(w, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden_view", list(HIDDEN_VIEWS), ids=list(HIDDEN_VIEWS))
@pytest.mark.parametrize("weight_view", list(WEIGHT_VIEWS), ids=list(WEIGHT_VIEWS))
def test_linear_safedpo_loss_strided(case, dtype, hidden_view, weight_view):
    backend, device = case
    gen = torch.Generator().manual_seed(46)
    B, T, H, V = 2, 5, 24, 67
    hidden = torch.randn(2 * B, T, H, generator=gen).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=gen) * 2 / H**0.5).to(dtype).to(device)
    bias = (torch.randn(V, generator=gen) * 0.5).to(dtype).to(device)
    labels = make_labels(2 * B, T, V, gen, device)
    ref = (torch.randn(2 * B, generator=gen) - 20).to(device)
    cs, rs = make_flags(B, gen, device)
    weight_view_of = WEIGHT_VIEWS[weight_view](weight)
    if weight_view == "weight.T.T":
        assert weight_view_of.stride(1) != 1

    views = (HIDDEN_VIEWS[hidden_view](hidden), weight_view_of, every_other(bias, 0))
    leaves = [t.detach().clone().requires_grad_() for t in views]
    got = linear_safedpo_loss(leaves[0], leaves[1], every_other(labels, 1), every_other(ref, 0), every_other(cs, 0),
                              every_other(rs, 0), bias=leaves[2], beta=0.5, delta=1.0, backend=backend)
    got.loss.backward()
    doubles = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    want = reference.safedpo_loss(reference.linear_logits(*doubles), labels, ref.double(), cs, rs, beta=0.5, delta=1.0)
    want.loss.backward()
    assert max_scaled_err(got.loss, want.loss) <= TOL[dtype][0]
    assert max_scaled_err(got.chosen_logps, want.chosen_logps) <= TOL[dtype][0]
    for leaf, d in zip(leaves, doubles):
        assert leaf.grad.shape == d.shape
        assert rel_err(leaf.grad, d.grad) <= TOL[dtype][1]


def test_linear_sequence_logps_packed_strided(case):
    backend, device = case
    gen = torch.Generator().manual_seed(47)
    total, H, V = 13, 16, 59
    hidden = torch.randn(total, H, generator=gen).to(device)
    weight = (torch.randn(V, H, generator=gen) / 4).to(device)
    labels = torch.randint(0, V, (total,), generator=gen).to(device)
    labels[[2, 9]] = -100
    cu = torch.tensor([0, 3, 8, 13], dtype=torch.int32, device=device)
    h = every_other(hidden, 0).detach().requires_grad_()
    got = linear_sequence_logps(h, every_other(weight, 1), every_other(labels, 0), cu_seqlens=every_other(cu, 0), backend=backend)
    got.sum().backward()
    hd = hidden.double().requires_grad_()
    want = reference.sequence_logps(hd @ weight.double().t(), labels, cu_seqlens=cu)
    want.sum().backward()
    assert max_scaled_err(got, want) <= 1e-5
    assert rel_err(h.grad, hd.grad) <= 1e-5
