"""Token statistics (SPEC "Token statistics"): per row, the summed entropy of the predicted distribution,
the summed mean logit (after any logit transform), how many labels are the top-1 prediction (the lowest
index of the maximum, as TRL counts it) and the counted tokens -- from the same pass as the log-probs, on
every backend, logits and fused-linear, padded and packed, against the float64 oracle; off by default."""

import pytest
import torch

from helpers import check_stats, make_flags, make_labels, make_logits, max_scaled_err, pack, rel_err, tied_case
from safedpo_kernels import (
    LinearSafeDPOLoss,
    SafeDPOLoss,
    linear_safedpo_loss,
    linear_sequence_logps,
    reference,
    safedpo_loss,
    sequence_logps,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_logits_path_statistics_match_float64(case, dtype, packed):
    backend, device = case
    logits, labels = tied_case(6, 7, 131, dtype, device, seed=1)
    cu = None
    if packed:
        logits, labels, cu = pack(logits, labels, [7, 3, 0, 5, 7, 2])
    x = logits.clone().requires_grad_()
    logps, stats = sequence_logps(x, labels, backend=backend, cu_seqlens=cu, token_stats=True)
    want = reference.token_stats(logits.double(), labels, cu_seqlens=cu)
    check_stats(stats, want, dtype)
    assert int(stats.top1.sum()) > 0 and bool((stats.top1 < stats.tokens).any())  # both outcomes occur
    plain = sequence_logps(logits, labels, backend=backend, cu_seqlens=cu)
    assert torch.equal(logps.detach(), plain)  # the statistics do not change the log-probs
    logps.sum().backward()  # and the log-probs keep their gradient
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_loss_reports_its_rows_statistics_in_data_order(case):
    backend, device = case
    gen = torch.Generator().manual_seed(2)
    B, T, V = 4, 6, 97
    logits = make_logits((2 * B, T, V), torch.float32, device, gen)
    labels = make_labels(2 * B, T, V, gen, device)
    cs, rs = make_flags(B, gen, device)  # includes a dropped and a swapped pair
    ref = torch.randn(2 * B, generator=gen).to(device)
    out = safedpo_loss(logits, labels, ref, cs, rs, backend=backend, token_stats=True)
    check_stats(out.token_stats, reference.token_stats(logits.double(), labels), torch.float32)
    off = safedpo_loss(logits, labels, ref, cs, rs, backend=backend)
    assert off.token_stats is None and torch.equal(off.loss, out.loss)
    module = SafeDPOLoss(token_stats=True, backend=backend)
    assert "token_stats=True" in repr(module)
    check_stats(module(logits, labels, ref, cs, rs).token_stats, reference.token_stats(logits.double(), labels),
                torch.float32)


TRANSFORMS = [dict(), dict(softcap=2.5, logit_scale=1.5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("transform", TRANSFORMS, ids=["plain", "scale+softcap"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fused_linear_statistics_are_those_of_the_transformed_logits(case, dtype, transform, packed, monkeypatch):
    """linear_sequence_logps and linear_safedpo_loss (its chunks small enough that a pair alone takes two
    passes, so both the kept-logits and the recomputing ways run) against the float64 transformed logits."""
    backend, device = case
    gen = torch.Generator().manual_seed(3)
    B, T, H, V = 3, 6, 19, 89
    hidden = torch.randn(2 * B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 2 / H**0.5
    bias = torch.randn(V, generator=gen) * 0.3
    labels = make_labels(2 * B, T, V, gen, "cpu")
    cs, rs = make_flags(B, gen, "cpu")
    cu = None
    if packed:
        hidden, labels, cu = pack(hidden, labels, [6, 2, 0, 5, 6, 4])
        cu = cu.to(device)
    hidden, weight, bias, labels = (t.to(dtype).to(device) if t.is_floating_point() else t.to(device)
                                    for t in (hidden, weight, bias, labels))
    z = reference.linear_logits(hidden.double(), weight.double(), bias.double(), **transform)
    want = reference.token_stats(z, labels, cu_seqlens=cu)
    _, stats = linear_sequence_logps(hidden, weight, labels, bias=bias, backend=backend, cu_seqlens=cu,
                                     token_stats=True, **transform)
    check_stats(stats, want, dtype)
    monkeypatch.setenv("SAFEDPO_LINEAR_CHUNK_BYTES", str(4 * V * 7))  # 7 token rows per chunk of pairs
    h = hidden.clone().requires_grad_()
    out = linear_safedpo_loss(h, weight, labels, None, cs.to(device), rs.to(device), bias=bias, backend=backend,
                              cu_seqlens=cu, token_stats=True, **transform)
    out.loss.backward()
    check_stats(out.token_stats, want, dtype)
    plain = linear_safedpo_loss(hidden, weight, labels, None, cs.to(device), rs.to(device), bias=bias,
                                backend=backend, cu_seqlens=cu, **transform)
    assert plain.token_stats is None and max_scaled_err(plain.loss, out.loss) == 0.0
    assert "token_stats=True" in repr(LinearSafeDPOLoss(token_stats=True))


def test_statistics_are_deterministic_and_leave_inputs_alone(case):
    backend, device = case
    logits, labels = tied_case(4, 5, 61, torch.bfloat16, device, seed=4)
    before = logits.clone()
    one = sequence_logps(logits, labels, backend=backend, token_stats=True)[1]
    two = sequence_logps(logits, labels, backend=backend, token_stats=True)[1]
    assert all(torch.equal(a, b) for a, b in zip(one, two)) and torch.equal(logits, before)
    assert rel_err(one.tokens.double(), (labels != -100).sum(-1).double()) == 0.0


def test_statistics_of_a_large_vocabulary_match_float64(case):
    """V = 8209 (odd, past 8192: the torch backend's CPU path slices each row up to its label instead of
    masking the chunk), with ties, a -inf logit, ignored tokens, labels 0 and V - 1."""
    backend, device = case
    logits, labels = tied_case(2, 6, 8209, torch.float32, device, seed=7)
    labels[0, 0], labels[1, 1] = 0, 8208
    logits[1, 1, 8208] = logits[1, 1].max() + 1  # the last column is the maximum: top-1
    logps, stats = sequence_logps(logits, labels, backend=backend, token_stats=True)
    check_stats(stats, reference.token_stats(logits.double(), labels), torch.float32)
    assert torch.equal(logps, sequence_logps(logits, labels, backend=backend))


def test_the_torch_backends_mean_logit_of_non_finite_rows_is_their_sum():
    """A row with a +inf logit (alone, or beside a -inf one), a -inf or a NaN logit: the torch backend's
    mean logit is the logits' own sum (+inf, NaN, -inf, NaN), as the oracle's; the others' are exact
    while the logits sit far from 0."""
    V = 50
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(5, 3, V, generator=gen) * 4 + 30  # far from 0: the shifted sum must not lose it
    labels = torch.full((5, 3), -100)
    labels[:, 1] = 7
    logits[0, 1, 3] = float("inf")
    logits[1, 1, 3], logits[1, 1, 9] = float("inf"), float("-inf")
    logits[2, 1, 5] = float("-inf")
    logits[3, 1, 4] = float("nan")
    stats = sequence_logps(logits, labels, backend="torch", token_stats=True)[1]
    want = reference.token_stats(logits.double(), labels)[1]
    assert [str(float(v)) for v in stats.mean_logit[:4]] == ["inf", "nan", "-inf", "nan"]
    torch.testing.assert_close(stats.mean_logit.double(), want, rtol=1e-6, atol=0, equal_nan=True)
