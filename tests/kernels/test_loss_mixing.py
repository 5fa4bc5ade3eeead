"""Loss mixing (SPEC "Loss mixing"): loss_type lists weighted by loss_weights, the "sft" term (the
negative log-likelihood of the kept pairs' preferred responses after T, one token-level mean), the
caller's denominators, and loss_terms -- on sequence log-probs, through the logits and the fused-linear
paths on every backend, padded and packed, against the float64 oracle."""

import math

import pytest
import torch

from helpers import TOL, make_flags, make_labels, make_logits, max_scaled_err, pack, rel_err
from safedpo_kernels import (
    LinearSafeDPOLoss,
    LossOptions,
    SafeDPOLoss,
    linear_safedpo_loss,
    loss_denominators,
    reference,
    safedpo_loss,
    safedpo_loss_from_logps,
)

MIXES = [
    (["sigmoid", "sft"], [1.0, 0.3]),
    (["sft"], None),
    (["hinge", "sft", "robust"], [0.5, 2.0, 1.0]),
    (["ipo", "sigmoid"], [0.1, 1.0]),
    ("sigmoid", [2.0]),
]
MIX_IDS = ["sigmoid+sft", "sft", "hinge+sft+robust", "ipo+sigmoid", "weighted-single"]


def logps_case(B, seed, average=False):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 9, (2 * B,), generator=gen)
    counts[1] = 0  # a response with no counted token (fully truncated)
    logps = torch.randn(2 * B, generator=gen, dtype=torch.float64) * 3 - 12
    if average:
        logps = logps / counts.clamp(min=1)
    ref = torch.randn(2 * B, generator=gen, dtype=torch.float64) * 3 - 12
    cs, rs = make_flags(B, gen, "cpu")
    return logps, ref, cs, rs, counts


@pytest.mark.parametrize("mix", MIXES, ids=MIX_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("average", [False, True])
def test_from_logps_matches_the_oracle(mix, reduction, average):
    loss_type, weights = mix
    logps, ref, cs, rs, counts = logps_case(7, seed=1, average=average)
    kw = dict(beta=0.2, delta=1.5, label_smoothing=0.1, loss_type=loss_type, loss_weights=weights,
              reduction=reduction, average=average)
    x = logps.float().requires_grad_()
    out = safedpo_loss_from_logps(x, ref.float(), cs, rs, token_counts=counts, **kw)
    out.loss.backward()
    xd = logps.clone().requires_grad_()
    want = reference.safedpo_loss_from_logps(xd, ref, cs, rs, counts, **kw)
    want.loss.backward()
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert max_scaled_err(out.loss, want.loss) <= 1e-6
    assert out.loss_terms.shape == (len([loss_type] if isinstance(loss_type, str) else loss_type),)
    assert max_scaled_err(out.loss_terms, want.loss_terms) <= 1e-6
    assert abs(float(out.loss_terms.sum()) - out.loss.item()) <= 1e-6 * max(1.0, abs(out.loss.item()))
    assert not out.loss_terms.requires_grad
    assert rel_err(x.grad, xd.grad) <= 1e-6


def test_the_sft_term_is_one_token_mean_of_the_preferred_responses_after_t():
    """By hand: pair 0 (safe, safe) keeps its chosen row, pair 1 (unsafe, safe) is swapped (its data
    rejected row is preferred), pair 2 (unsafe, unsafe) is dropped, pair 3 (safe, unsafe) kept."""
    logps = torch.tensor([-4.0, -6.0, -1.0, -3.0, -5.0, -9.0, -7.0, -2.0])
    counts = torch.tensor([2, 3, 1, 4, 5, 6, 7, 8])
    cs = torch.tensor([True, False, False, True])
    rs = torch.tensor([True, True, False, False])
    out = safedpo_loss_from_logps(logps, None, cs, rs, loss_type="sft", token_counts=counts)
    # preferred after T: row 0 (-4, 2 tokens), row 5 (-9, 6 tokens), row 3 (-3, 4 tokens)
    assert out.loss.item() == pytest.approx((4 + 9 + 3) / (2 + 6 + 4))
    avg = safedpo_loss_from_logps(logps, None, cs, rs, loss_type="sft", token_counts=counts, average=True)
    assert avg.loss.item() == pytest.approx((4 * 2 + 9 * 6 + 3 * 4) / 12)
    total = safedpo_loss_from_logps(logps, None, cs, rs, loss_type="sft", token_counts=counts, reduction="sum")
    assert total.loss.item() == pytest.approx(16.0)
    pairs, tokens = loss_denominators(counts, cs, rs, safedpo_options())
    assert (float(pairs), float(tokens)) == (3.0, 12.0)


def safedpo_options(**kw):
    return LossOptions(**kw)


def test_a_single_name_is_todays_loss_bitwise():
    logps, ref, cs, rs, counts = logps_case(6, seed=2)
    for reduction in ("mean", "sum"):
        base = safedpo_loss_from_logps(logps.float(), ref.float(), cs, rs, reduction=reduction)
        for kw in (dict(loss_type=["sigmoid"]), dict(loss_weights=[1.0]), dict(token_counts=counts)):
            other = safedpo_loss_from_logps(logps.float(), ref.float(), cs, rs, reduction=reduction, **kw)
            assert all(torch.equal(a, b) for a, b in zip(base[:8], other[:8]))
        assert torch.equal(base.loss_terms, base.loss.reshape(1))


def test_denominators_split_a_batch_into_exact_shares():
    """Two halves with the whole batch's divisors add up to the whole batch's loss and gradient."""
    logps, ref, cs, rs, counts = logps_case(8, seed=3)
    kw = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.3, delta=2.0)
    whole_x = logps.float().requires_grad_()
    whole = safedpo_loss_from_logps(whole_x, ref.float(), cs, rs, token_counts=counts, **kw)
    whole.loss.backward()
    denominators = loss_denominators(counts, cs, rs, safedpo_options(**kw))
    x = logps.float().requires_grad_()
    parts = []
    for sl in (slice(0, 3), slice(3, 8)):
        rows = torch.cat([torch.arange(8)[sl], 8 + torch.arange(8)[sl]])
        part = safedpo_loss_from_logps(x[rows], ref.float()[rows], cs[sl], rs[sl], token_counts=counts[rows],
                                       denominators=denominators, **kw)
        part.loss.backward()
        parts.append(part)
    assert abs(sum(float(p.loss) for p in parts) - float(whole.loss)) <= 1e-6
    assert max_scaled_err(sum(p.loss_terms for p in parts), whole.loss_terms) <= 1e-6
    assert rel_err(x.grad, whole_x.grad) <= 1e-6
    plain = (int(denominators[0]), int(denominators[1]))  # plain numbers work as well
    again = safedpo_loss_from_logps(logps.float(), ref.float(), cs, rs, token_counts=counts, denominators=plain, **kw)
    assert torch.equal(again.loss, whole.loss.detach())


def test_zero_divisors_give_zero_terms_with_zero_gradients():
    logps, ref, _, _, counts = logps_case(3, seed=4)
    unsafe = torch.zeros(3, dtype=torch.bool)  # every pair dropped
    x = logps.float().requires_grad_()
    out = safedpo_loss_from_logps(x, ref.float(), unsafe, unsafe, loss_type=["sigmoid", "sft"], token_counts=counts)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.equal(out.loss_terms, torch.zeros(2)) and torch.equal(x.grad, torch.zeros(6))
    cs, rs = torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    y = logps.float().requires_grad_()
    out = safedpo_loss_from_logps(y, ref.float(), cs, rs, loss_type=["sigmoid", "sft"], token_counts=counts,
                                  denominators=(3, 0))
    out.loss.backward()
    assert out.loss_terms[1].item() == 0.0 and torch.isfinite(y.grad).all() and y.grad[:3].abs().sum() > 0
    z = logps.float().requires_grad_()
    out = safedpo_loss_from_logps(z, ref.float(), cs, rs, loss_type=["sigmoid", "sft"], loss_weights=[0.0, 0.0],
                                  token_counts=counts)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.equal(z.grad, torch.zeros(6))


@pytest.mark.parametrize("change, words", [
    (dict(loss_type=["sigmoid", "dpo"]), r"unknown name\(s\) \['dpo'\]; the supported ones are \('sigmoid', 'robust', "
                                         r"'hinge', 'ipo', 'sft'\)"),
    (dict(loss_type=["sft", "sft"]), "more than once"),
    (dict(loss_type=[]), "at least one"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "1 weight\\(s\\) for 2 loss_type"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, -0.1]), r"loss_weights\[1\]"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[math.inf, 1.0]), r"loss_weights\[0\]"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, math.nan]), r"loss_weights\[1\]"),
    (dict(loss_type="sft", token_counts=None), "needs token_counts"),
    (dict(denominators=(1.0,)), "denominators must be \\(pairs, tokens\\)"),
    (dict(denominators=(2.0, -1.0)), "tokens must be a finite number >= 0"),
    (dict(denominators=(2.0, 3.0), reduction="sum"), "reduction='mean'"),
    (dict(loss_type="sft", token_counts=torch.ones(5, dtype=torch.long)), r"token_counts must have shape \(6,\)"),
    (dict(loss_type="sft", token_counts=torch.ones(6)), "token_counts must be an integer tensor"),
])
def test_bad_mixing_arguments_name_themselves(change, words):
    logps, ref, cs, rs, counts = logps_case(3, seed=5)
    kw = {"token_counts": counts, **change}
    with pytest.raises((ValueError, TypeError), match=words):
        safedpo_loss_from_logps(logps.float(), ref.float(), cs, rs, **kw)
    if "token_counts" not in change and "denominators" not in change:  # the fused entry points and modules too
        logits = torch.randn(6, 4, 11)
        labels = torch.randint(0, 11, (6, 4))
        opts = {k: v for k, v in change.items()}
        with pytest.raises(ValueError, match=words):
            safedpo_loss(logits, labels, ref.float(), cs, rs, **opts)
        with pytest.raises(ValueError, match=words):
            SafeDPOLoss(**opts)
        with pytest.raises(ValueError, match=words):
            LinearSafeDPOLoss(**opts)


def logits_case(B, T, V, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = make_logits((2 * B, T, V), dtype, device, gen)
    labels = make_labels(2 * B, T, V, gen, device)
    cs, rs = make_flags(B, gen, device)
    ref = (torch.randn(2 * B, generator=gen) * 3 - 20).to(device)
    return logits, labels, cs, rs, ref


def logits_oracle(logits, labels, ref, cs, rs, **kw):
    x = logits.detach().double().requires_grad_()
    out = reference.safedpo_loss(x, labels, ref.double(), cs, rs, **kw)
    out.loss.backward()
    return out, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("average", [False, True])
def test_logits_path_mixes_in_the_same_pass(case, dtype, packed, average):
    backend, device = case
    logits, labels, cs, rs, ref = logits_case(3, 7, 67, dtype, device, seed=10)
    cu = None
    if packed:
        logits, labels, cu = pack(logits, labels, [7, 2, 0, 5, 6, 7])
    kw = dict(beta=0.4, delta=1.0, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7], average=average,
              cu_seqlens=cu)
    x = logits.detach().clone().requires_grad_()
    out = safedpo_loss(x, labels, ref, cs, rs, backend=backend, **kw)
    out.loss.backward()
    want, want_grad = logits_oracle(logits, labels, ref, cs, rs, **kw)
    out_tol, grad_tol = TOL[dtype]
    assert max_scaled_err(out.loss, want.loss) <= out_tol
    assert max_scaled_err(out.loss_terms, want.loss_terms) <= out_tol
    assert rel_err(x.grad, want_grad) <= grad_tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fused_linear_path_equals_the_logits_path(case, dtype, packed, monkeypatch):
    """Hidden states and the head, with small chunks of pairs (the call's divisors are every chunk's),
    against float64; and the logits path on the same logits."""
    backend, device = case
    monkeypatch.setenv("SAFEDPO_LINEAR_CHUNK_BYTES", str(4 * 97 * 9))  # about 9 token rows per chunk
    gen = torch.Generator().manual_seed(11)
    B, T, H, V = 3, 6, 21, 97
    hidden = torch.randn(2 * B, T, H, generator=gen).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=gen) * 2 / H**0.5).to(dtype).to(device)
    labels = make_labels(2 * B, T, V, gen, device)
    cs, rs = make_flags(B, gen, device)
    ref = (torch.randn(2 * B, generator=gen) * 3 - 20).to(device)
    cu = None
    if packed:
        hidden, labels, cu = pack(hidden, labels, [6, 3, 0, 6, 4, 5])
    kw = dict(beta=0.3, delta=2.0, loss_type=["hinge", "sft"], loss_weights=[1.0, 0.4], softcap=3.0, cu_seqlens=cu)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_safedpo_loss(h, w, labels, ref, cs, rs, backend=backend, **kw)
    out.loss.backward()
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    mix = {k: v for k, v in kw.items() if k != "softcap"}
    want = reference.safedpo_loss(reference.linear_logits(hd, wd, softcap=3.0), labels, ref.double(), cs, rs, **mix)
    want.loss.backward()
    out_tol, grad_tol = TOL[dtype]
    assert max_scaled_err(out.loss, want.loss) <= out_tol
    assert max_scaled_err(out.loss_terms, want.loss_terms) <= out_tol
    assert rel_err(h.grad, hd.grad) <= grad_tol and rel_err(w.grad, wd.grad) <= grad_tol
    with torch.no_grad():
        logits = reference.linear_logits(hidden.float(), weight.float(), softcap=3.0)
        via_logits = safedpo_loss(logits, labels, ref, cs, rs, backend=backend, **mix)
    assert max_scaled_err(out.loss, via_logits.loss) <= 1e-5


def test_fused_losses_take_the_callers_denominators(case):
    """Both fused paths: two halves with the whole batch's denominators add up to the whole loss and its
    gradient (what a trainer's micro-batches do)."""
    backend, device = case
    logits, labels, cs, rs, ref = logits_case(4, 6, 53, torch.float32, device, seed=12)
    kw = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.25], backend=backend)
    x_whole = logits.clone().requires_grad_()
    whole = safedpo_loss(x_whole, labels, ref, cs, rs, **kw)
    whole.loss.backward()
    counts = reference.token_counts(labels).to(device)
    denominators = loss_denominators(counts, cs, rs, safedpo_options(loss_type=["sigmoid", "sft"]))
    x = logits.clone().requires_grad_()
    total = 0.0
    for sl in (slice(0, 1), slice(1, 4)):
        rows = torch.cat([torch.arange(4)[sl], 4 + torch.arange(4)[sl]]).to(device)
        part = safedpo_loss(x[rows], labels[rows], ref[rows], cs[sl], rs[sl], denominators=denominators, **kw)
        part.loss.backward()
        total += float(part.loss)
    assert abs(total - float(whole.loss)) <= 1e-6 and rel_err(x.grad, x_whole.grad) <= 1e-6
    weight = torch.randn(53, 16, generator=torch.Generator().manual_seed(3)).to(device) * 0.3
    hidden = torch.randn(8, 6, 16, generator=torch.Generator().manual_seed(4)).to(device)
    full = linear_safedpo_loss(hidden, weight, labels, ref, cs, rs, **kw).loss
    parts = [linear_safedpo_loss(hidden[r], weight, labels[r], ref[r], cs[sl], rs[sl], denominators=denominators, **kw)
             .loss for sl, r in ((slice(0, 2), torch.tensor([0, 1, 4, 5])), (slice(2, 4), torch.tensor([2, 3, 6, 7])))]
    assert abs(float(sum(parts)) - float(full)) <= 1e-6


def test_modules_mix_and_say_so():
    module = SafeDPOLoss(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.1])
    assert "loss_type=['sigmoid', 'sft']" in repr(module) and "loss_weights=[1.0, 0.1]" in repr(module)
    logits, labels, cs, rs, ref = logits_case(2, 5, 31, torch.float32, "cpu", seed=13)
    out = module(logits, labels, ref, cs, rs)
    want, _ = logits_oracle(logits, labels, ref, cs, rs, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.1])
    assert max_scaled_err(out.loss, want.loss) <= 1e-5 and out.loss_terms.shape == (2,)
    assert "loss_weights=[2.0]" in repr(LinearSafeDPOLoss(loss_weights=[2.0]))
