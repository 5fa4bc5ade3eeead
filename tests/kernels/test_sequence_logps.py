"""sequence_logps on every backend against the float64 reference, with the numerical tolerances."""

import pytest
import torch

from helpers import (
    TOL,
    float64_logps_and_grad,
    logps_and_grad,
    make_labels,
    make_logits,
    max_scaled_err,
    pack,
    random_case,
    rel_err,
)
from safedpo_kernels import reference, sequence_logps

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check(got, want, dtype):
    out_tol, grad_tol = TOL[dtype]
    assert got[0].dtype == torch.float32
    assert max_scaled_err(got[0], want[0]) <= out_tol
    assert got[1].dtype == dtype
    assert rel_err(got[1], want[1]) <= grad_tol


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("average", [False, True])
def test_padded_matches_reference(case, dtype, average):
    backend, device = case
    N, T, V = 4, 9, 301
    logits, labels, upstream = random_case(N, T, V, dtype, device, seed=1)
    got = logps_and_grad(logits, labels, upstream, average=average, backend=backend)
    want = float64_logps_and_grad(logits, labels, upstream, average=average)
    check(got, want, dtype)
    assert got[0][1].item() == 0.0  # the fully ignored row
    assert torch.count_nonzero(got[1][1]) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_gradients_rounded_to_nearest(case, dtype):
    """A bf16/fp16 gradient is the float32 gradient rounded to nearest, as a GPU stores it: the Triton
    interpreter's own bf16 conversion truncates (biased, twice the error), which would make CI see
    other numbers than a card. Against the float64 gradient rounded to the dtype, only values within a
    hair of a rounding boundary may land on the neighbour."""
    backend, device = case
    N, T, V = 2, 5, 1031
    logits, labels, upstream = random_case(N, T, V, dtype, device, seed=11)
    _, grad = logps_and_grad(logits, labels, upstream, backend=backend)
    _, want = float64_logps_and_grad(logits, labels, upstream)
    differ = (grad.cpu() != want.to(dtype)).float().mean().item()
    assert differ < 0.01, f"{differ:.1%} of the gradient is not the rounded exact value"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shifted_view_without_copy(case, dtype):
    """The caller's usual logits[:, :-1] (not flattenable) with int32 labels."""
    backend, device = case
    N, T, V = 3, 8, 257
    full, labels, upstream = random_case(N, T, V, dtype, device, seed=2, extra_positions=1)
    logits = full[:, :-1]
    labels = labels.to(torch.int32)
    got = logps_and_grad(logits, labels, upstream, backend=backend)
    want = float64_logps_and_grad(logits, labels, upstream)
    check(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("average", [False, True])
def test_packed_matches_padded_and_reference(case, dtype, average):
    backend, device = case
    gen = torch.Generator().manual_seed(3)
    N, T, V = 5, 7, 199
    logits = make_logits((N, T, V), dtype, device, gen)
    labels = make_labels(N, T, V, gen, device)
    lengths = [7, 3, 0, 5, 6]  # includes an empty sequence
    packed, packed_labels, cu = pack(logits, labels, lengths)
    upstream = torch.randn(N, generator=gen).to(device)
    got = logps_and_grad(packed, packed_labels, upstream, average=average, cu_seqlens=cu, backend=backend)
    want = float64_logps_and_grad(packed, packed_labels, upstream, average=average, cu_seqlens=cu)
    check(got, want, dtype)
    # Same sequences, padded with ignored tokens, give the same values.
    padded_labels = labels.clone()
    for n, L in enumerate(lengths):
        padded_labels[n, L:] = -100
    padded = logps_and_grad(logits, padded_labels, upstream, average=average, backend=backend)
    assert max_scaled_err(padded[0], got[0]) <= TOL[dtype][0]


def test_deterministic_bitwise(case):
    backend, device = case
    N, T, V = 4, 9, 515
    logits, labels, upstream = random_case(N, T, V, torch.float32, device, seed=4)
    a = logps_and_grad(logits, labels, upstream, backend=backend)
    b = logps_and_grad(logits, labels, upstream, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("packed", [False, True])
def test_inputs_not_modified(case, packed):
    backend, device = case
    gen = torch.Generator().manual_seed(5)
    N, T, V = 4, 6, 130
    logits = make_logits((N, T, V), torch.bfloat16, device, gen)
    labels = make_labels(N, T, V, gen, device)
    kw = {}
    if packed:
        logits, labels, kw["cu_seqlens"] = pack(logits, labels, [6, 2, 4, 5])
    saved = [t.clone() for t in (logits, labels, *kw.values())]
    logps_and_grad(logits, labels, torch.ones(N, device=device), backend=backend, **kw)
    for before, after in zip(saved, (logits, labels, *kw.values())):
        assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_writes_into_logits(case, dtype):
    backend, device = case
    gen = torch.Generator().manual_seed(6)
    N, T, V = 3, 7, 263
    logits = make_logits((N, T + 1, V), dtype, device, gen)
    labels = make_labels(N, T, V, gen, device)
    upstream = torch.randn(N, generator=gen).to(device)
    expected = logps_and_grad(logits[:, :-1], labels, upstream, backend=backend)

    leaf = logits.clone().requires_grad_()
    work = leaf * 1  # a non-leaf, like a model's output logits
    view = work[:, :-1]
    storage = work.data_ptr()
    out = sequence_logps(view, labels, inplace_backward=True, backend=backend)
    (out * upstream).sum().backward()
    assert torch.equal(out, expected[0])
    # The gradient now lives in the logits' own storage, and reached the leaf unchanged.
    assert work.data_ptr() == storage
    assert torch.equal(work.detach()[:, :-1], expected[1])
    assert torch.equal(leaf.grad[:, :-1], expected[1])
    assert torch.equal(work.detach()[:, -1], logits[:, -1])  # outside the view: untouched


def test_large_logits_stable(case):
    backend, device = case
    gen = torch.Generator().manual_seed(7)
    N, T, V = 2, 5, 300
    logits = make_logits((N, T, V), torch.float32, device, gen, scale=1e4)
    labels = make_labels(N, T, V, gen, device, prompt_max=0)
    labels[1] = torch.argmax(logits[1], dim=-1)  # a sequence of near-certain tokens
    upstream = torch.ones(N, device=device)
    got = logps_and_grad(logits, labels, upstream, backend=backend)
    want = float64_logps_and_grad(logits, labels, upstream)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    check(got, want, torch.float32)


def test_neg_inf_logits_and_nan_rows(case):
    """-inf entries (a masked vocabulary) are fine; NaN only reaches the rows that hold it."""
    backend, device = case
    gen = torch.Generator().manual_seed(8)
    N, T, V = 4, 6, 140
    logits = make_logits((N, T, V), torch.float32, device, gen)
    labels = make_labels(N, T, V, gen, device, prompt_max=0)
    labels[0, 2] = 5
    logits[:, :, : V // 2] = float("-inf")  # first half of the vocabulary masked out...
    labels = torch.where(labels >= 0, labels % (V // 2) + V // 2, labels)  # ...targets in the other half
    logits[0, 2, 11] = float("nan")
    logits[2, 0, :] = float("nan")
    labels[2, 0] = -100  # NaN at an ignored token does not count
    upstream = torch.randn(N, generator=gen).to(device)
    out, grad = logps_and_grad(logits, labels, upstream, backend=backend)
    assert torch.isnan(out[0])
    assert torch.isnan(grad[0, 2]).any()
    clean = [1, 2, 3]
    want = float64_logps_and_grad(torch.nan_to_num(logits, nan=0.0), labels, upstream)
    assert max_scaled_err(out[clean], want[0][clean]) <= 1e-5
    assert rel_err(grad[clean], want[1][clean]) <= 1e-5
    assert torch.count_nonzero(grad[2, 0]) == 0


def test_unvalidated_bad_label_gives_nan_not_a_crash(case):
    backend, device = case
    gen = torch.Generator().manual_seed(9)
    N, T, V = 4, 5, 100
    logits = make_logits((N, T, V), torch.float32, device, gen)
    labels = make_labels(N, T, V, gen, device, prompt_max=0)
    want = float64_logps_and_grad(logits, labels, torch.ones(N, device=device))
    labels[0, 1] = V + 1000
    labels[2, 3] = -7
    out, grad = logps_and_grad(logits, labels, torch.ones(N, device=device), backend=backend, validate=False)
    assert torch.isnan(out[0]) and torch.isnan(out[2])
    assert max_scaled_err(out[[1, 3]], want[0][[1, 3]]) <= 1e-5
    assert rel_err(grad[[1, 3]], want[1][[1, 3]]) <= 1e-5


def test_a_non_finite_packed_sequence_leaves_the_others_alone(case):
    """Packed rows are summed by a prefix scan: a -inf token log-prob (a label whose logit is -inf) or a
    NaN in one sequence stays in that sequence, and the sequences after it keep their values."""
    backend, device = case
    gen = torch.Generator().manual_seed(10)
    logits = make_logits((13, 17), torch.float32, device, gen)
    labels = torch.randint(0, 17, (13,), generator=gen).to(device)
    cu = torch.tensor([0, 3, 6, 9, 13], dtype=torch.int32, device=device)
    want = reference.sequence_logps(logits.double(), labels, cu_seqlens=cu)
    logits[1, labels[1]] = float("-inf")  # sequence 0's log-prob is -inf
    logits[7, 2] = float("nan")  # sequence 2's is NaN
    out = sequence_logps(logits, labels, cu_seqlens=cu, backend=backend)
    assert out[0] == float("-inf") and torch.isnan(out[2])
    assert max_scaled_err(out[[1, 3]], want[[1, 3]]) <= 1e-5
