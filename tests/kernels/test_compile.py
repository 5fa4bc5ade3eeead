"""Inside compiled training steps: every kernel entry is a torch.library op that passes opcheck, and a
step calling sequence_logps, safedpo_loss, linear_safedpo_loss and safedpo_loss_from_logps with
validate=False compiles with torch.compile(fullgraph=True) -- no graph break -- and equals eager."""

import pytest
import torch

from helpers import TOL, make_flags, make_labels, make_logits, max_scaled_err, pack, rel_err
from safedpo_kernels import linear_safedpo_loss, reference, safedpo_loss, safedpo_loss_from_logps, sequence_logps
from safedpo_kernels._env import major_minor
from safedpo_kernels.dispatch import resolve_backend
from safedpo_kernels.ops import (
    linear_safedpo_loss_op,
    linear_sequence_logps_grad_op,
    linear_sequence_logps_op,
    sequence_logps_grad_inplace_op,
    sequence_logps_grad_op,
    sequence_logps_op,
)
from safedpo_kernels.options import LOSS_TYPES


def op_calls(backend, device):
    """(op, args) for every registered op, padded and packed, on fresh random inputs."""
    gen = torch.Generator().manual_seed(30)
    N, T, V, H = 4, 5, 37, 8
    logits = make_logits((N, T, V), torch.float32, device, gen).requires_grad_()
    labels = make_labels(N, T, V, gen, device).reshape(-1)
    cu = torch.tensor([0, 3, 10, 10, 20], device=device)
    seq_args = (logits, labels, None, -100, False, False, backend, False)
    _, lse, count, _ = sequence_logps_op(*seq_args)
    upstream = torch.randn(N, generator=gen).to(device)
    hidden = torch.randn(N, T, H, generator=gen).to(device).requires_grad_()
    weight = torch.randn(V, H, generator=gen).to(device).requires_grad_()
    bias = torch.randn(V, generator=gen).to(device).requires_grad_()
    lin_args = (hidden, weight, bias, labels, None, -100, True, 0.5, 30.0, backend, True)
    _, lse2, count2, _ = linear_sequence_logps_op(*lin_args)
    cs, rs = make_flags(N // 2, gen, device)
    return [
        (sequence_logps_op, seq_args),
        (sequence_logps_op, (logits.detach().reshape(N * T, V).requires_grad_(), labels, cu, -100, True, True, backend,
                             True)),
        (sequence_logps_grad_op, (upstream, logits.detach(), labels, lse.detach(), count, None, -100, False, backend)),
        (sequence_logps_grad_inplace_op, (upstream, logits.detach().clone(), labels, lse.detach(), count, None, -100,
                                          False, backend)),
        (linear_sequence_logps_op, lin_args),
        (linear_sequence_logps_grad_op, (upstream, hidden.detach(), weight.detach(), bias.detach(), labels, lse2.detach(),
                                         count2, None, -100, True, 0.5, 30.0, backend, True, True, True)),
        (linear_safedpo_loss_op, (hidden.detach().reshape(N * T, H).requires_grad_(), weight, None, labels,
                                  torch.randn(N, generator=gen).to(device), cs, rs, cu, -100, 1.0, None, 0.1, 2.0, True,
                                  True, 0.1, "robust", "mean", False, [1.0], None, False, backend, True, True, False)),
        (linear_safedpo_loss_op, (hidden.detach(), weight, bias, labels, None, cs, rs, None, -100, 1.0, None,
                                  0.1, 2.0, True, True, 0.0, "sigmoid,sft", "mean", True, [1.0, 0.5],
                                  torch.tensor([3.0, 17.0], dtype=torch.float64, device=device), True, backend, True,
                                  True, True)),
    ]


def test_every_op_passes_opcheck(case):
    backend, device = case
    name = resolve_backend(backend, torch.device(device))  # loads the C++ kernels where they are used
    seen = set()
    for op, args in op_calls(name, device):
        torch.library.opcheck(op, args)
        seen.add(op._qualname)
    assert len(seen) == 6 and all(q.startswith("safedpo::") for q in seen)


def compiled_step(backend, loss_type, cu, labels, ref, cs, rs, inplace):
    """A step through every entry point; a loss list also takes its divisors as tensors (as a trainer
    passes its global batch's), and from_logps its token counts."""
    mix = {} if isinstance(loss_type, str) else dict(loss_weights=[1.0, 0.5][: len(loss_type)])
    counts = reference.token_counts(labels, cu_seqlens=cu)
    divisors = None if isinstance(loss_type, str) else tuple(torch.tensor([2.0, 9.0], dtype=torch.float64,
                                                                          device=labels.device).unbind())

    def step(logits, hidden, weight):
        kw = dict(backend=backend, validate=False, cu_seqlens=cu)
        a = sequence_logps(logits * 1.0, labels, **kw).sum()
        b = safedpo_loss(logits * 2.0, labels, ref, cs, rs, loss_type=loss_type, inplace_backward=inplace,
                         denominators=divisors, **mix, **kw).loss
        c = linear_safedpo_loss(hidden, weight, labels, ref, cs, rs, loss_type=loss_type, **mix, **kw).loss
        d = safedpo_loss_from_logps(sequence_logps(logits * 0.5, labels, **kw), ref, cs, rs, loss_type=loss_type,
                                    token_counts=counts, **mix).loss
        return a + b + c + d

    return step


def step_inputs(seed: int, B: int, T: int, V: int, H: int, device):
    """(generator, logits, labels, hidden, weight) of a random (2B, T) step, float32, a head of width H."""
    gen = torch.Generator().manual_seed(seed)
    logits = make_logits((2 * B, T, V), torch.float32, device, gen)
    labels = make_labels(2 * B, T, V, gen, device)
    hidden = torch.randn(2 * B, T, H, generator=gen).to(device)
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(device)
    return gen, logits, labels, hidden, weight


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("loss_type", [*LOSS_TYPES, ("sigmoid", "sft")], ids=[*LOSS_TYPES, "sigmoid+sft"])
def test_a_fullgraph_compiled_step_equals_eager(case, loss_type, packed):
    """aot_eager traces the whole step (dynamo + AOT autograd, as inductor does) without compiling C++,
    which keeps the matrix quick; test_inductor_step_equals_eager compiles one step for real."""
    backend, device = case
    if backend == "triton" and (packed or loss_type != "sigmoid"):
        pytest.skip("the interpreter is slow: the Triton backend compiles once, padded")
    B = 3
    gen, logits, labels, hidden, weight = step_inputs(31, B, 6, 53, 16, device)
    cu = None
    if packed:
        lengths = [6, 2, 5, 0, 4, 6]
        logits, labels, cu = pack(logits, labels, lengths)
        hidden = torch.cat([hidden[n, :L] for n, L in enumerate(lengths)])
    ref = torch.randn(2 * B, generator=gen).to(device)
    cs, rs = make_flags(B, gen, device)
    eager = compiled_step(backend, loss_type, cu, labels, ref, cs, rs, inplace=False)
    compiled = torch.compile(compiled_step(backend, loss_type, cu, labels, ref, cs, rs, inplace=False), fullgraph=True,
                             backend="aot_eager")
    results = []
    for fn in (eager, compiled):
        leaves = [t.clone().requires_grad_() for t in (logits, hidden, weight)]
        out = fn(*leaves)
        out.backward()
        results.append((out.detach(), [x.grad for x in leaves]))
    (got, got_grads), (want, want_grads) = results[1], results[0]
    assert max_scaled_err(got, want) <= TOL[torch.float32][0]
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) <= TOL[torch.float32][1]
    torch._dynamo.reset()


@pytest.mark.parametrize("path", ["logits", "linear"])
def test_a_compiled_step_returns_the_whole_output_with_token_statistics(case, path):
    """What a trainer's compiled forward returns: the SafeDPOOutput itself, token statistics included
    (torch 2.11's dynamo could not return one that NamedTuple._replace had made), equal to eager."""
    backend, device = case
    if backend == "triton" and path == "linear":
        pytest.skip("the interpreter is slow: the logits path covers the Triton backend")
    B = 2
    gen, logits, labels, hidden, weight = step_inputs(35, B, 5, 31, 8, device)
    ref = torch.randn(2 * B, generator=gen).to(device)
    cs, rs = make_flags(B, gen, device)
    kw = dict(backend=backend, validate=False, token_stats=True, loss_type=["sigmoid", "sft"])

    def step(x, w):
        if path == "logits":
            return safedpo_loss(x * 1.0, labels, ref, cs, rs, inplace_backward=True, **kw)
        return linear_safedpo_loss(x, w, labels, ref, cs, rs, **kw)

    first = logits if path == "logits" else hidden
    outs = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        x, w = first.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(x, w)
        out.loss.backward()
        outs.append((out, x.grad))
    torch._dynamo.reset()
    (want, want_grad), (got, got_grad) = outs
    assert type(got).__name__ == "SafeDPOOutput" and type(got.token_stats).__name__ == "TokenStats"
    for name in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "loss_terms"):
        assert max_scaled_err(getattr(got, name), getattr(want, name)) <= TOL[torch.float32][0], name
    assert torch.equal(got.kept, want.kept) and torch.equal(got.swapped, want.swapped)
    for name in ("entropy", "mean_logit"):
        assert max_scaled_err(getattr(got.token_stats, name), getattr(want.token_stats, name)) <= 1e-5, name
    assert torch.equal(got.token_stats.top1, want.token_stats.top1)
    assert torch.equal(got.token_stats.tokens, want.token_stats.tokens)
    assert want.token_stats.tokens.sum() > 0
    assert rel_err(got_grad, want_grad) <= TOL[torch.float32][1]


# PyTorch before 2.12 cannot trace a backward that writes into a leaf input of the compiled graph
# (AOT autograd's input-mutation copy trips the leaf check); logits a model computes are no leaf.
LEAF_INPLACE_COMPILES = major_minor() >= (2, 12)


@pytest.mark.parametrize("logits_from", ["model", "leaf"])
def test_inplace_backward_compiles_too(case, logits_from):
    """The in-place backward inside a compiled step equals the out-of-place eager gradient, for logits a
    head computes (inside or before the compiled function) and for a leaf tensor of logits."""
    backend, device = case
    if backend == "triton":
        pytest.skip("covered eagerly; the interpreter is slow")
    if logits_from == "leaf" and not LEAF_INPLACE_COMPILES:
        pytest.skip(f"torch {torch.__version__}: a compiled in-place backward into a leaf needs torch >= 2.12")
    gen = torch.Generator().manual_seed(32)
    N, T, V, H = 4, 5, 41, 6
    labels = make_labels(N, T, V, gen, device)
    cs, rs = make_flags(N // 2, gen, device)
    hidden = torch.randn(N, T, H, generator=gen).to(device)
    weight0 = torch.randn(V, H, generator=gen).to(device)
    logits0 = make_logits((N, T, V), torch.float32, device, gen)

    def loss(x, inplace):
        return safedpo_loss(x, labels, None, cs, rs, backend=backend, validate=False, inplace_backward=inplace).loss

    def expected():
        leaf = (weight0 if logits_from == "model" else logits0).clone().requires_grad_()
        loss(hidden @ leaf.T if logits_from == "model" else leaf, False).backward()
        return leaf.grad

    def compiled_grad(inside: bool):
        leaf = (weight0 if logits_from == "model" else logits0).clone().requires_grad_()
        if logits_from == "leaf":
            torch.compile(lambda x: loss(x, True), fullgraph=True, backend="aot_eager")(leaf).backward()
        elif inside:  # the head inside the compiled step
            torch.compile(lambda w: loss(hidden @ w.T, True), fullgraph=True, backend="aot_eager")(leaf).backward()
        else:  # logits from an eager head, the loss compiled alone
            torch.compile(lambda x: loss(x, True), fullgraph=True, backend="aot_eager")(hidden @ leaf.T).backward()
        torch._dynamo.reset()
        return leaf.grad

    want = expected()
    for inside in ((True, False) if logits_from == "model" else (True,)):
        assert rel_err(compiled_grad(inside), want) <= TOL[torch.float32][1]


def test_validate_false_steps_have_no_graph_break(case):
    """torch._dynamo.explain counts the breaks: none with validate=False; validate=True reads the labels'
    range (and cu_seqlens) on the host, which breaks the graph there and only there."""
    backend, device = case
    gen = torch.Generator().manual_seed(33)
    B, T, V, H = 2, 4, 29, 8
    logits = make_logits((2 * B, T, V), torch.float32, device, gen).requires_grad_()
    labels = make_labels(2 * B, T, V, gen, device)
    hidden = torch.randn(2 * B, T, H, generator=gen).to(device).requires_grad_()
    weight = torch.randn(V, H, generator=gen).to(device).requires_grad_()
    cs, rs = make_flags(B, gen, device)
    step = compiled_step(backend, "sigmoid", None, labels, None, cs, rs, inplace=False)
    assert torch._dynamo.explain(step)(logits, hidden, weight).graph_break_count == 0

    def checked(x):
        return sequence_logps(x, labels, backend=backend).sum()

    explained = torch._dynamo.explain(checked)(logits)
    assert explained.graph_break_count >= 1
    assert all("check_labels_in_range" in str(r.user_stack[-1]) or "item" in r.reason for r in explained.break_reasons)
    torch._dynamo.reset()


def test_inductor_step_equals_eager():
    """One step compiled for real (inductor, C++ on the CPU) on the default CPU backend."""
    gen = torch.Generator().manual_seed(34)
    B, T, V, H = 2, 5, 47, 16
    labels = make_labels(2 * B, T, V, gen, "cpu")
    hidden = torch.randn(2 * B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    cs, rs = make_flags(B, gen, "cpu")

    def step(h, w):
        out = linear_safedpo_loss(h, w, labels, None, cs, rs, validate=False)
        return out.loss + safedpo_loss(h @ w.t(), labels, None, cs, rs, validate=False).loss

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        fn(*leaves).backward()
        grads.append([x.grad for x in leaves])
    for g, w in zip(*grads):
        assert rel_err(g, w) <= 1e-5
    torch._dynamo.reset()
