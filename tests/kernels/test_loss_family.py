"""The SafeDAA loss family on sequence log-probs (safedpo_loss_from_logps) and through the fused losses:
every loss type x T on/off x delta x label smoothing x reference-free x reduction, against the formulas
written from the papers in float64, and with delta = 0 and T off equal to the DPO loss of the same name
as TRL computes it."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import make_flags, make_labels, make_logits, max_scaled_err, rel_err
from safedpo_kernels import SafeDPOLoss, linear_safedpo_loss, reference, safedpo_loss, safedpo_loss_from_logps

LOSS_TYPES = ["sigmoid", "robust", "hinge", "ipo"]


def paper_loss(loss_type, logp, ref, cs, rs, beta, delta, swap, drop, eps, reduction):
    """Per the papers, pair by pair in plain Python floats (float64): SafeDPO's T and margin (arXiv
    2505.20065), the DPO sigmoid loss with conservative label smoothing, robust DPO (Chowdhury et al. 2024),
    the hinge loss of SLiC (Zhao et al. 2023), IPO (Azar et al. 2023), the margin moved by delta."""
    B = len(cs)
    total, kept = 0.0, 0
    for i in range(B):
        w, l = i, B + i
        h_w, h_l = 1 - int(cs[i]), 1 - int(rs[i])
        if drop and h_w and h_l:
            continue
        if swap and h_w and not h_l:
            w, l, h_w, h_l = l, w, h_l, h_w
        d = (logp[w] - ref[w]) - (logp[l] - ref[l])
        u = beta * d - (h_l - h_w) * delta
        log_sig = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731
        if loss_type == "sigmoid":
            value = -(1 - eps) * log_sig(u) - eps * log_sig(-u)
        elif loss_type == "robust":
            value = (-(1 - eps) * log_sig(u) + eps * log_sig(-u)) / (1 - 2 * eps)
        elif loss_type == "hinge":
            value = max(0.0, 1 - u)
        else:
            value = (u / beta - 1 / (2 * beta)) ** 2
        total += value
        kept += 1
    return total / max(kept, 1) if reduction == "mean" else total


def trl_dpo(loss_type, chosen, rejected, ref_chosen, ref_rejected, beta, eps):
    """TRL 1.16's DPO losses (reverse KL), as its DPOTrainer forms them from sequence log-probs: the
    per-pair loss of chosen versus rejected, averaged over the batch. For IPO the log-probs passed are
    already token averages (TRL divides the log-ratios by the completion lengths)."""
    delta_score = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss_type == "sigmoid":  # TRL 1.16's sigmoid has no label smoothing
        per = -F.logsigmoid(beta * delta_score)
    elif loss_type == "hinge":
        per = torch.relu(1 - beta * delta_score)
    elif loss_type == "ipo":
        per = (delta_score - 1 / (2 * beta)) ** 2
    else:
        per = (-(1 - eps) * F.logsigmoid(beta * delta_score) + eps * F.logsigmoid(-beta * delta_score)) / (1 - 2 * eps)
    return per.mean()


def inputs(B=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = (torch.randn(2 * B, generator=gen) * 4 - 30).double()
    ref = (logp + torch.randn(2 * B, generator=gen) * 2).double()
    cs, rs = make_flags(B, gen, "cpu")
    return logp, ref, cs, rs


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("t_on", [True, False], ids=["T", "noT"])
@pytest.mark.parametrize("delta", [0.0, 2.5])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("ref_free", [False, True], ids=["ref", "ref-free"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_from_logps_matches_the_paper_formulas(loss_type, t_on, delta, eps, ref_free, reduction):
    logp, ref, cs, rs = inputs(seed=hash((loss_type, t_on, delta, eps, ref_free, reduction)) % 1000)
    beta = 0.3
    x = logp.clone().float().requires_grad_()
    out = safedpo_loss_from_logps(x, None if ref_free else ref.float(), cs, rs, beta=beta, delta=delta, swap=t_on,
                                  drop_both_unsafe=t_on, label_smoothing=eps, loss_type=loss_type, reduction=reduction)
    ref_used = torch.zeros_like(ref) if ref_free else ref
    want = paper_loss(loss_type, logp.tolist(), ref_used.tolist(), cs.tolist(), rs.tolist(), beta, delta, t_on, t_on, eps,
                      reduction)
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - want) <= 1e-5 * max(1.0, abs(want))
    # Gradients against autograd through the float64 oracle.
    out.loss.backward()
    xd = logp.clone().requires_grad_()
    oracle = reference.safedpo_loss_from_logps(xd, None if ref_free else ref, cs, rs, beta=beta, delta=delta, swap=t_on,
                                               drop_both_unsafe=t_on, label_smoothing=eps, loss_type=loss_type,
                                               reduction=reduction)
    assert abs(oracle.loss.item() - want) <= 1e-9 * max(1.0, abs(want))
    oracle.loss.backward()
    assert rel_err(x.grad, xd.grad) <= 1e-5


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_plain_dpo_equals_trl(loss_type):
    """delta = 0, swap and drop off: the DPO loss of the same name, as TRL computes it."""
    logp, ref, cs, rs = inputs(B=8, seed=11)
    eps = 0.0 if loss_type == "sigmoid" else 0.1
    out = safedpo_loss_from_logps(logp.float(), ref.float(), cs, rs, beta=0.2, delta=0.0, swap=False,
                                  drop_both_unsafe=False, label_smoothing=eps, loss_type=loss_type)
    want = trl_dpo(loss_type, logp[:8], logp[8:], ref[:8], ref[8:], 0.2, eps)
    assert abs(out.loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_losses_carry_the_family(case, loss_type, reduction):
    """safedpo_loss and linear_safedpo_loss compute each loss type through the same function."""
    backend, device = case
    gen = torch.Generator().manual_seed(3)
    B, T, V, H = 3, 6, 97, 16
    logits = make_logits((2 * B, T, V), torch.float32, device, gen, scale=2.0)
    labels = make_labels(2 * B, T, V, gen, device)
    cs, rs = make_flags(B, gen, device)
    ref = (reference.sequence_logps(logits.double(), labels, average=True) + 0.3).float()
    kw = dict(beta=0.4, delta=1.5, label_smoothing=0.1, loss_type=loss_type, reduction=reduction, average=True)
    x = logits.clone().requires_grad_()
    got = safedpo_loss(x, labels, ref, cs, rs, backend=backend, **kw)
    got.loss.backward()
    xd = logits.double().requires_grad_()
    want = reference.safedpo_loss(xd, labels, ref.double(), cs, rs, **kw)
    want.loss.backward()
    assert max_scaled_err(got.loss, want.loss) <= 1e-5
    assert rel_err(x.grad, xd.grad) <= 1e-5
    module = SafeDPOLoss(**{k: v for k, v in kw.items()}, backend=backend)
    assert max_scaled_err(module(logits, labels, ref, cs, rs).loss, want.loss) <= 1e-5

    hidden = torch.randn(2 * B, T, H, generator=gen).to(device)
    weight = (torch.randn(V, H, generator=gen) / 2).to(device)
    h = hidden.clone().requires_grad_()
    got = linear_safedpo_loss(h, weight, labels, None, cs, rs, backend=backend, **kw)  # reference-free
    got.loss.backward()
    hd = hidden.double().requires_grad_()
    want = reference.safedpo_loss(hd @ weight.double().t(), labels, None, cs, rs, **kw)
    want.loss.backward()
    assert max_scaled_err(got.loss, want.loss) <= 1e-5
    assert rel_err(h.grad, hd.grad) <= 1e-5


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (dict(loss_type="kto"), ValueError, "loss_type"),
        (dict(loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing"),
        (dict(reduction="none"), ValueError, "reduction"),
        (dict(beta=float("inf")), ValueError, "beta"),
        (dict(delta="10"), ValueError, "delta"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    ],
)
def test_bad_settings_are_named(change, exc, words):
    logp, ref, cs, rs = inputs()
    with pytest.raises(exc, match=words):
        safedpo_loss_from_logps(logp.float(), ref.float(), cs, rs, **change)


def test_bad_tensors_are_named():
    logp, ref, cs, rs = inputs()
    for args, words in [((logp.long(), ref, cs, rs), "policy_logps"), ((logp[:5], ref, cs, rs), "odd N"),
                        ((logp, ref[:4], cs, rs), "ref_logps"), ((logp, ref, cs[:2], rs), "chosen_safe"),
                        ((logp, ref, cs.float(), rs), "chosen_safe"), ((logp.view(2, -1), ref, cs, rs), "policy_logps")]:
        with pytest.raises((ValueError, TypeError), match=words):
            safedpo_loss_from_logps(*args)


def test_metrics_and_no_kept_pair():
    logp, ref, _, _ = inputs(B=3)
    unsafe = torch.zeros(3, dtype=torch.bool)
    x = logp.float().requires_grad_()
    out = safedpo_loss_from_logps(x, ref.float(), unsafe, unsafe, beta=0.1)
    assert out.loss.item() == 0.0 and not out.kept.any()
    out.loss.backward()
    assert torch.count_nonzero(x.grad) == 0
    assert torch.allclose(out.chosen_rewards, 0.1 * (logp[:3] - ref[:3]).float())
    assert not out.chosen_logps.requires_grad


@pytest.mark.parametrize("combo", list(itertools.product([True, False], repeat=2)))
def test_flags_as_integers_equal_bools(combo):
    logp, ref, cs, rs = inputs()
    a = safedpo_loss_from_logps(logp.float(), ref.float(), cs, rs, swap=combo[0], drop_both_unsafe=combo[1])
    b = safedpo_loss_from_logps(logp.float(), ref.float(), cs.long(), rs.to(torch.int32), swap=combo[0],
                                drop_both_unsafe=combo[1])
    assert torch.equal(a.loss, b.loss)
