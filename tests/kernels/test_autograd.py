"""Autograd behaviour of every entry point on every backend: the in-place backward on a leaf, a second or
double backward (clear errors), and torch.autocast (honoured by the fused-linear functions, which keep
float32 logits)."""

import pytest
import torch

from helpers import make_flags, make_labels, make_logits, rel_err
from safedpo_kernels import linear_safedpo_loss, reference, safedpo_loss, sequence_logps


def test_inplace_backward_on_a_leaf_reuses_its_memory(case):
    backend, device = case
    gen = torch.Generator().manual_seed(70)
    logits = make_logits((3, 6, 97), torch.float32, device, gen)
    labels = make_labels(3, 6, 97, gen, device)
    xd = logits.double().requires_grad_()
    reference.sequence_logps(xd, labels).sum().backward()
    leaf = logits.clone().requires_grad_()
    sequence_logps(leaf, labels, inplace_backward=True, backend=backend).sum().backward()
    assert leaf.grad.data_ptr() == leaf.data_ptr()  # no copy: the gradient lives in the logits' memory
    assert rel_err(leaf.grad, xd.grad) <= 1e-5


def test_a_second_backward_through_an_inplace_graph_raises(case):
    backend, device = case
    gen = torch.Generator().manual_seed(71)
    logits = make_logits((2, 5, 64), torch.float32, device, gen).requires_grad_()
    labels = make_labels(2, 5, 64, gen, device)
    work = logits * 1
    out = sequence_logps(work, labels, inplace_backward=True, backend=backend).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize("entry", ["sequence_logps", "safedpo_loss", "linear_safedpo_loss"])
def test_double_backward_is_a_clear_error(case, entry):
    backend, device = case
    gen = torch.Generator().manual_seed(72)
    labels = make_labels(2, 5, 40, gen, device)
    cs, rs = make_flags(1, gen, device)
    if entry == "linear_safedpo_loss":
        x = torch.randn(2, 5, 8, generator=gen).to(device).requires_grad_()
        w = torch.randn(40, 8, generator=gen).to(device)
        out = linear_safedpo_loss(x, w, labels, torch.zeros(2, device=device), cs, rs, backend=backend).loss
    else:
        x = make_logits((2, 5, 40), torch.float32, device, gen).requires_grad_()
        out = (sequence_logps(x, labels, backend=backend).sum() if entry == "sequence_logps"
               else safedpo_loss(x, labels, torch.zeros(2, device=device), cs, rs, backend=backend).loss)
    with pytest.raises(RuntimeError, match="first-order gradients only.*create_graph"):
        torch.autograd.grad(out, x, create_graph=True)
    (g,) = torch.autograd.grad(out, x)  # a first-order backward of the same graph still works
    assert torch.isfinite(g).all()



# ----------------------------------------------------------------------------- mixed precision (autocast)


def _run_all(hidden, weight, logits, labels, ref, flags, backend, cast=None):
    """Every entry point's outputs and gradients, on fresh leaves; ``cast``: the dtype the head's
    operands are cast to (differentiably) before the fused-linear calls."""
    from safedpo_kernels import linear_sequence_logps

    h, w, x = (t.detach().clone().requires_grad_() for t in (hidden, weight, logits))
    seq = sequence_logps(x, labels, backend=backend)
    loss = safedpo_loss(x, labels, ref, *flags, backend=backend).loss
    (seq.sum() + loss).backward()
    def head():  # one cast per call, as autocast does
        return (h, w) if cast is None else (h.to(cast), w.to(cast))

    lin_seq = linear_sequence_logps(*head(), labels, backend=backend)
    lin = linear_safedpo_loss(*head(), labels, ref, *flags, softcap=20.0, backend=backend).loss
    (lin_seq.sum() + lin).backward()
    return [seq, loss, lin_seq, lin, x.grad, h.grad, w.grad]


def test_autocast_is_honoured_and_the_logits_stay_float32(case):
    """Inside a trainer's bf16 mixed precision (torch.autocast) the fused-linear functions take the head's
    operands in bf16, as autocast would give them to F.linear (float32 parameters still get float32
    gradients), and everything else is computed as outside it: the result equals the call outside
    autocast on operands cast to bf16. (The CPU backends' chunked matmuls gave bfloat16 logits under
    autocast -- log-probs off by ~|z| / 256 per token -- and the native backend raised.)"""
    backend, device = case
    gen = torch.Generator().manual_seed(21)
    B, T, V, H = 2, 6, 97, 16
    hidden = torch.randn(2 * B, T, H, generator=gen).to(device)
    weight = (torch.randn(V, H, generator=gen) / 2).to(device)
    logits = make_logits((2 * B, T, V), torch.bfloat16, device, gen)
    labels = make_labels(2 * B, T, V, gen, device)
    ref = torch.randn(2 * B, generator=gen).to(device)
    flags = make_flags(B, gen, device)
    want = _run_all(hidden, weight, logits, labels, ref, flags, backend, cast=torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = _run_all(hidden, weight, logits, labels, ref, flags, backend)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    assert got[5].dtype == got[6].dtype == torch.float32
    exact = _run_all(hidden, weight, logits, labels, ref, flags, backend)  # float32 operands, no autocast
    assert rel_err(got[2], exact[2]) > 0  # autocast did apply to the head's operands
