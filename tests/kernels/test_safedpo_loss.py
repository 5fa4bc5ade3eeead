"""safedpo_loss on every backend against the float64 reference: T, the loss, the metrics, tolerances."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from helpers import TOL, make_flags, make_labels, make_logits, max_scaled_err, pack, rel_err, same_outputs
from safedpo_kernels import SafeDPOLoss, SafeDPOOutput, linear_safedpo_loss, reference, safedpo_loss, safedpo_loss_from_logps

FLAG_SETS = [
    dict(delta=10.0, swap=True, drop_both_unsafe=True, label_smoothing=0.0),  # SafeDPO
    dict(delta=5.0, swap=False, drop_both_unsafe=True, label_smoothing=0.0),  # NoSwap
    dict(delta=2.0, swap=True, drop_both_unsafe=False, label_smoothing=0.2),  # conservative, keep all
    dict(delta=0.0, swap=False, drop_both_unsafe=False, label_smoothing=0.0),  # plain DPO
]


def batch(B, T, V, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = make_logits((2 * B, T, V), dtype, device, gen, scale=2.0)
    labels = make_labels(2 * B, T, V, gen, device)
    # Reference log-probs near the policy's, so that margins are O(1) and the loss is not saturated.
    ref_logps = (reference.sequence_logps(logits.double(), labels) + torch.randn(2 * B, generator=gen).to(device)).float()
    chosen_safe, rejected_safe = make_flags(B, gen, device)
    return logits, labels, ref_logps, chosen_safe, rejected_safe


def run(logits, labels, ref_logps, cs, rs, **kw):
    x = logits.detach().clone().requires_grad_()
    out = safedpo_loss(x, labels, ref_logps, cs, rs, **kw)
    out.loss.backward()
    return out, x.grad


def oracle(logits, labels, ref_logps, cs, rs, cu_seqlens=None, **kw):
    x = logits.detach().double().requires_grad_()
    out = reference.safedpo_loss(x, labels, ref_logps.double(), cs, rs, cu_seqlens=cu_seqlens, **kw)
    out.loss.backward()
    return out, x.grad


def check(got, want, dtype):
    out_tol, grad_tol = TOL[dtype]
    (g_out, g_grad), (w_out, w_grad) = got, want
    assert isinstance(g_out, SafeDPOOutput)
    assert g_out.loss.dtype == torch.float32 and g_out.loss.dim() == 0
    assert max_scaled_err(g_out.loss, w_out.loss) <= out_tol
    for field in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        assert max_scaled_err(getattr(g_out, field), getattr(w_out, field)) <= out_tol, field
        assert not getattr(g_out, field).requires_grad
    assert torch.equal(g_out.kept.cpu(), w_out.kept.cpu())
    assert torch.equal(g_out.swapped.cpu(), w_out.swapped.cpu())
    assert g_grad.dtype == dtype
    assert rel_err(g_grad, w_grad) <= grad_tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("flags", FLAG_SETS, ids=["safedpo", "noswap", "smooth-keepall", "dpo"])
@pytest.mark.parametrize("average", [False, True])
def test_matches_reference(case, dtype, flags, average):
    backend, device = case
    logits, labels, ref_logps, cs, rs = batch(B=6, T=7, V=211, dtype=dtype, device=device, seed=10)
    if average:  # ref_logps in the same (averaged) units as the policy's
        ref_logps = reference.sequence_logps(logits.double(), labels, average=True).float() + 0.3
    kw = dict(beta=0.3, average=average, **flags)
    check(run(logits, labels, ref_logps, cs, rs, backend=backend, **kw), oracle(logits, labels, ref_logps, cs, rs, **kw), dtype)


def test_packed_matches_reference(case):
    backend, device = case
    logits, labels, ref_logps, cs, rs = batch(B=3, T=8, V=150, dtype=torch.bfloat16, device=device, seed=11)
    packed, packed_labels, cu = pack(logits, labels, [8, 5, 1, 7, 8, 3])
    kw = dict(beta=0.2, delta=5.0)
    got = run(packed, packed_labels, ref_logps, cs, rs, cu_seqlens=cu, backend=backend, **kw)
    want = oracle(packed, packed_labels, ref_logps, cs, rs, cu_seqlens=cu, **kw)
    check(got, want, torch.bfloat16)


def test_transformation_roles(case):
    """T: keep (safe, *), swap (unsafe, safe), drop (unsafe, unsafe), read off the metrics."""
    backend, device = case
    logits, labels, ref_logps, _, _ = batch(B=4, T=5, V=64, dtype=torch.float32, device=device, seed=12)
    cs = torch.tensor([1, 1, 0, 0], dtype=torch.bool, device=device)
    rs = torch.tensor([1, 0, 1, 0], dtype=torch.bool, device=device)
    out = safedpo_loss(logits, labels, ref_logps, cs, rs, backend=backend)
    logp = reference.sequence_logps(logits.double(), labels).float()
    B = 4
    chosen_rows = [0, 1, B + 2, 3]  # pair 2 (unsafe preferred, safe other) swapped
    rejected_rows = [B + 0, B + 1, 2, B + 3]
    assert max_scaled_err(out.chosen_logps, logp[chosen_rows]) <= 1e-5
    assert max_scaled_err(out.rejected_logps, logp[rejected_rows]) <= 1e-5
    assert out.kept.tolist() == [True, True, True, False]
    assert out.swapped.tolist() == [False, False, True, False]
    assert not safedpo_loss(logits, labels, ref_logps, cs, rs, swap=False, backend=backend).swapped.any()
    # Pair 3 is dropped: its rows get exactly zero gradient.
    x = logits.clone().requires_grad_()
    safedpo_loss(x, labels, ref_logps, cs, rs, backend=backend).loss.backward()
    assert torch.count_nonzero(x.grad[[3, B + 3]]) == 0
    assert torch.count_nonzero(x.grad[[0, B]]) > 0


def test_plain_dpo_equivalence(case):
    """delta = 0, swap off, drop off is exactly the standard DPO sigmoid loss, whatever the flags."""
    backend, device = case
    logits, labels, ref_logps, cs, rs = batch(B=5, T=6, V=97, dtype=torch.float32, device=device, seed=13)
    beta, B = 0.1, 5
    got = run(logits, labels, ref_logps, cs, rs, beta=beta, delta=0.0, swap=False, drop_both_unsafe=False, backend=backend)
    x = logits.double().requires_grad_()
    logp = reference.sequence_logps(x, labels)
    ref = ref_logps.double()
    dpo = -F.logsigmoid(beta * ((logp[:B] - ref[:B]) - (logp[B:] - ref[B:]))).mean()
    dpo.backward()
    assert max_scaled_err(got[0].loss, dpo) <= 1e-5
    assert rel_err(got[1], x.grad) <= 1e-5


def test_no_pair_kept_gives_exact_zero(case):
    backend, device = case
    logits, labels, ref_logps, _, _ = batch(B=3, T=5, V=80, dtype=torch.float32, device=device, seed=14)
    unsafe = torch.zeros(3, dtype=torch.bool, device=device)
    out, grad = run(logits, labels, ref_logps, unsafe, unsafe, backend=backend)
    assert out.loss.item() == 0.0 and not out.kept.any()
    assert torch.count_nonzero(grad) == 0


def test_integer_flags_and_module_agree(case):
    backend, device = case
    logits, labels, ref_logps, cs, rs = batch(B=4, T=6, V=120, dtype=torch.float32, device=device, seed=15)
    a = safedpo_loss(logits, labels, ref_logps, cs, rs, beta=0.2, delta=2.0, backend=backend)
    b = safedpo_loss(logits, labels, ref_logps, cs.long(), rs.to(torch.int32), beta=0.2, delta=2.0, backend=backend)
    c = SafeDPOLoss(beta=0.2, delta=2.0, backend=backend)(logits, labels, ref_logps, cs, rs)
    for x, y in itertools.product([a], [b, c]):
        assert same_outputs(x, y)


def test_ref_logps_get_no_gradient(case):
    backend, device = case
    logits, labels, ref_logps, cs, rs = batch(B=2, T=5, V=70, dtype=torch.float32, device=device, seed=16)
    ref = ref_logps.clone().requires_grad_()
    out = safedpo_loss(logits.requires_grad_(), labels, ref, cs, rs, backend=backend)
    out.loss.backward()
    assert ref.grad is None
    assert logits.grad is not None


def test_deterministic_and_inputs_untouched(case):
    backend, device = case
    inputs = batch(B=4, T=7, V=333, dtype=torch.bfloat16, device=device, seed=17)
    saved = [t.clone() for t in inputs]
    a = run(*inputs, backend=backend)
    b = run(*inputs, backend=backend)
    for before, after in zip(saved, inputs):
        assert torch.equal(before, after)
    assert same_outputs(a[0], b[0])
    assert torch.equal(a[1], b[1])


def test_inplace_backward_loss(case):
    backend, device = case
    logits, labels, ref_logps, cs, rs = batch(B=3, T=6, V=111, dtype=torch.float16, device=device, seed=18)
    expected = run(logits, labels, ref_logps, cs, rs, backend=backend)
    leaf = logits.clone().requires_grad_()
    work = leaf * 1
    out = safedpo_loss(work, labels, ref_logps, cs, rs, inplace_backward=True, backend=backend)
    out.loss.backward()
    assert torch.equal(out.loss, expected[0].loss)
    assert torch.equal(work.detach(), expected[1])
    assert torch.equal(leaf.grad, expected[1])


def test_the_output_carries_its_loss_term_and_no_token_statistics(case):
    """SPEC's SafeDPOOutput: after swapped come loss_terms ((K,) float32, no gradient, adding up to the
    loss; one term for a single loss_type) and token_stats (None unless asked for), on every path."""
    backend, device = case
    gen = torch.Generator().manual_seed(11)
    logits = make_logits((4, 5, 37), torch.float32, device, gen).requires_grad_()
    labels = make_labels(4, 5, 37, gen, device)
    cs, rs = torch.tensor([True, False], device=device), torch.tensor([False, False], device=device)
    ref = torch.randn(4, generator=gen).to(device)
    hidden = torch.randn(4, 5, 8, generator=gen).to(device)
    weight = torch.randn(37, 8, generator=gen).to(device)
    outs = [safedpo_loss(logits, labels, ref, cs, rs, backend=backend, delta=1.0),
            linear_safedpo_loss(hidden, weight, labels, ref, cs, rs, backend=backend, delta=1.0),
            safedpo_loss_from_logps(torch.randn(4, generator=gen), ref.cpu(), cs.cpu(), rs.cpu(), delta=1.0),
            reference.safedpo_loss(logits.double(), labels, ref, cs, rs, delta=1.0)]
    for out in outs:
        assert out._fields[-3:] == ("swapped", "loss_terms", "token_stats") and out.token_stats is None
        assert out.loss_terms.shape == (1,) and out.loss_terms.dtype == torch.float32
        assert not out.loss_terms.requires_grad and float(out.loss_terms.sum()) == float(out.loss.float())
