"""Vocabulary- and context-parallel losses on torch.distributed (gloo, CPU processes): every rank gets the
single-process result, and the gradients of its own shard or slice, at the contract's tolerances. Every case
has 4 pairs: the four safety combinations.

Each test starts 2 or 4 processes; every process runs all the cases and reports what failed. Groups on 4
processes form a 2 x 2 mesh: vocabulary shards along one axis, token slices along the other."""

import datetime
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import TOL, check_stats, make_flags, make_labels, make_logits, max_scaled_err, rel_err, tied_case
from safedpo_kernels import (
    available_backends,
    linear_safedpo_loss,
    linear_sequence_logps,
    reference,
    safedpo_loss,
    sequence_logps,
)

# several CPU processes per test: one such test at a time (make test runs xdist with --dist loadgroup)
pytestmark = pytest.mark.xdist_group("processes")

BACKENDS = [b for b in available_backends("cpu")]


def _worker(rank, world, init_file, result_dir, suite):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    # A rank that fails alone must not leave the others waiting in a collective for good.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    failures = []
    try:
        for name, fn in SUITES[suite](world):
            try:
                fn()
            except Exception:  # every case reports; one failure does not hide the others
                failures.append(f"{name}: {traceback.format_exc(limit=6)}")
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(failures))
        dist.barrier()
        dist.destroy_process_group()


def run(world: int, suite: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp, suite), nprocs=world, join=True)
        failures = [open(os.path.join(tmp, f"rank{r}.txt")).read() for r in range(world)]
    assert not any(failures), "\n".join(f for f in failures if f)[:6000]


# ------------------------------------------------------------------------------------------ the layouts


def groups_of(world: int):
    """(vocab group, context group, vocab rank, vocab size, context rank, context size) of this process:
    2 ranks: one of them parallel (the caller picks); 4 ranks: a 2 x 2 mesh. Every rank creates every
    group, in the same order."""
    rank = dist.get_rank()
    if world == 2:
        everyone = dist.new_group([0, 1])
        return everyone, rank
    rows = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # vocabulary shards: ranks of a row
    cols = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # token slices: ranks of a column
    return rows[rank // 2], cols[rank % 2], rank % 2, rank // 2


def shard_cols(x: torch.Tensor, r: int, p: int) -> torch.Tensor:
    width = x.shape[-1] // p
    return x[..., r * width:(r + 1) * width]


def slice_positions(T: int, r: int, p: int):
    """Uneven contiguous slices of T positions (the last rank gets the rest)."""
    bounds = [0] + [T * (k + 1) // (p + 1) + k for k in range(p - 1)] + [T]
    return bounds[r], bounds[r + 1]


def full_case(seed, dtype, B=4, T=7, V=48, packed=False):
    gen = torch.Generator().manual_seed(seed)
    logits = make_logits((2 * B, T, V), dtype, "cpu", gen)
    labels = make_labels(2 * B, T, V, gen, "cpu")
    ref = torch.randn(2 * B, generator=gen)
    cs, rs = make_flags(B, gen, "cpu")
    return logits, labels, ref, cs, rs


def linear_case_of(seed, T, H, V, B=4, **kw):
    """Hidden states, a head weight, labels and flags (no reference: ref_logps None), and the float64
    reference's output (with the loss keywords ``kw``) and leaves (hidden, weight) after its backward."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    labels = make_labels(2 * B, T, V, gen, "cpu")
    cs, rs = make_flags(B, gen, "cpu")
    leaves = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    want = reference.safedpo_loss(leaves[0] @ leaves[1].t(), labels, None, cs, rs, **kw)
    want.loss.backward()
    return hidden, weight, labels, cs, rs, want, leaves


def want_loss(logits, labels, ref, cs, rs, **kw):
    x = logits.detach().double().requires_grad_()
    out = reference.safedpo_loss(x, labels, ref.double(), cs, rs, **kw)
    out.loss.backward()
    return out, x.grad


def check_out(got, want, dtype):
    tol = TOL[dtype][0]
    for field in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        assert max_scaled_err(getattr(got, field), getattr(want, field)) <= tol, field
    assert torch.equal(got.kept, want.kept) and torch.equal(got.swapped, want.swapped)
    assert max_scaled_err(got.loss_terms, want.loss_terms) <= tol


# ------------------------------------------------------------------------------------------ the cases


def one_axis(world: int, axis: int):
    """(group, rank in it) of this process along one axis: on 2 ranks both of them; on the 2 x 2 mesh the
    vocabulary row (axis 0) or the token column (axis 1)."""
    if world == 2:
        return groups_of(world)
    vocab, context, vrank, crank = groups_of(world)
    return (vocab, vrank) if axis == 0 else (context, crank)


def vocab_cases(world):
    group, rank = one_axis(world, 0)
    p = 2
    cases = []
    for backend in BACKENDS:
        for dtype in (torch.float32, torch.bfloat16):
            def logits_case(backend=backend, dtype=dtype):
                logits, labels, ref, cs, rs = full_case(1, dtype)
                want, want_grad = want_loss(logits, labels, ref, cs, rs, beta=0.3, delta=2.0, label_smoothing=0.1)
                x = shard_cols(logits, rank, p).clone().requires_grad_()
                got = safedpo_loss(x, labels, ref, cs, rs, beta=0.3, delta=2.0, label_smoothing=0.1, backend=backend,
                                   vocab_group=group)
                got.loss.backward()
                check_out(got, want, dtype)
                assert rel_err(x.grad, shard_cols(want_grad, rank, p)) <= TOL[dtype][1]

            cases.append((f"vocab logits {backend} {dtype}", logits_case))

        def packed_case(backend=backend):
            logits, labels, ref, cs, rs = full_case(2, torch.float32)
            lengths = [7, 3, 5, 6, 0, 4, 2, 7]
            packed = torch.cat([logits[n, :L] for n, L in enumerate(lengths)])
            packed_labels = torch.cat([labels[n, :L] for n, L in enumerate(lengths)])
            cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
            want = reference.sequence_logps(packed.double(), packed_labels, cu_seqlens=cu, average=True)
            x = shard_cols(packed, rank, p).clone().requires_grad_()
            got = sequence_logps(x, packed_labels, cu_seqlens=cu, average=True, backend=backend, vocab_group=group,
                                 inplace_backward=True)
            assert max_scaled_err(got, want) <= 1e-5
            got.sum().backward()
            full = packed.double().requires_grad_()
            reference.sequence_logps(full, packed_labels, cu_seqlens=cu, average=True).sum().backward()
            assert rel_err(x.grad, shard_cols(full.grad, rank, p)) <= 1e-5

        cases.append((f"vocab packed average inplace {backend}", packed_case))

        def lonely_shard(backend=backend):
            """Every target in the first shard: the other rank owns no label at all."""
            logits, labels, ref, cs, rs = full_case(3, torch.float32)
            labels = torch.where(labels >= 0, labels % (logits.shape[-1] // p), labels)
            want, want_grad = want_loss(logits, labels, ref, cs, rs)
            x = shard_cols(logits, rank, p).clone().requires_grad_()
            got = safedpo_loss(x, labels, ref, cs, rs, backend=backend, vocab_group=group)
            got.loss.backward()
            check_out(got, want, torch.float32)
            assert rel_err(x.grad, shard_cols(want_grad, rank, p)) <= 1e-5

        cases.append((f"vocab lonely shard {backend}", lonely_shard))

        def stats_case(backend=backend):
            """Token statistics over the whole vocabulary: ties at the top across the shard boundary (a
            label in the second shard tied with a column of the first is not top-1, the reverse is), a
            -inf logit; the logits path and the fused-linear loss."""
            logits, labels = tied_case(6, 5, 40, torch.float32, "cpu", seed=11)
            labels[1, 0], labels[2, 0] = 25, 5
            logits[1, 0, 25] = logits[1, 0, 3] = logits[1, 0].max() + 1.0  # tied with an earlier shard
            logits[2, 0, 5] = logits[2, 0, 30] = logits[2, 0].max() + 1.0  # tied with a later shard
            want = reference.token_stats(logits.double(), labels)
            _, stats = sequence_logps(shard_cols(logits, rank, p), labels, backend=backend, vocab_group=group,
                                      token_stats=True)
            check_stats(stats, want, torch.float32)
            assert want[2][2] >= 1  # the label tied with a later shard's column is a top-1 prediction
            hidden, weight, labels2, cs, rs, _, leaves = linear_case_of(12, T=5, H=8, V=40)
            want2 = reference.token_stats(leaves[0].detach() @ leaves[1].detach().t(), labels2)
            w = shard_cols(weight.t(), rank, p).t().contiguous()
            got = linear_safedpo_loss(hidden, w, labels2, None, cs, rs, backend=backend, vocab_group=group,
                                      token_stats=True)
            check_stats(got.token_stats, want2, torch.float32)

        cases.append((f"vocab token statistics {backend}", stats_case))

        def linear_case(backend=backend):
            gen = torch.Generator().manual_seed(4)
            B, T, H, V = 4, 6, 12, 40
            hidden = torch.randn(2 * B, T, H, generator=gen)
            weight = torch.randn(V, H, generator=gen) / H**0.5
            bias = torch.randn(V, generator=gen) * 0.1
            labels = make_labels(2 * B, T, V, gen, "cpu")
            ref = torch.randn(2 * B, generator=gen)
            cs, rs = make_flags(B, gen, "cpu")
            leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
            want = reference.safedpo_loss(reference.linear_logits(*leaves), labels, ref.double(), cs, rs,
                                          loss_type=["robust", "sft"], loss_weights=[1.0, 0.5], label_smoothing=0.2)
            want.loss.backward()
            h = hidden.clone().requires_grad_()
            w = shard_cols(weight.t(), rank, p).t().clone().requires_grad_()
            b = shard_cols(bias, rank, p).clone().requires_grad_()
            got = linear_safedpo_loss(h, w, labels, ref, cs, rs, bias=b, loss_type=["robust", "sft"],
                                      loss_weights=[1.0, 0.5], label_smoothing=0.2, backend=backend, vocab_group=group)
            got.loss.backward()
            check_out(got, want, torch.float32)
            assert rel_err(h.grad, leaves[0].grad) <= 1e-5  # complete on every rank
            assert rel_err(w.grad, shard_cols(leaves[1].grad.t(), rank, p).t()) <= 1e-5
            assert rel_err(b.grad, shard_cols(leaves[2].grad, rank, p)) <= 1e-5
            h2 = hidden.clone().requires_grad_()
            w2 = w.detach().clone().requires_grad_()
            seq = linear_sequence_logps(h2, w2, labels, backend=backend, vocab_group=group)
            full_h = hidden.double().requires_grad_()
            want_seq = reference.sequence_logps(full_h @ weight.double().t(), labels)
            assert max_scaled_err(seq, want_seq) <= 1e-5
            (seq * ref).sum().backward()
            (want_seq * ref.double()).sum().backward()
            assert rel_err(h2.grad, full_h.grad) <= 1e-5

        cases.append((f"vocab linear {backend}", linear_case))
    cases.append(("traffic is O(tokens)", lambda: traffic_case(group)))
    return cases


def traffic_case(group):
    """The bytes a rank all-reduces: proportional to the tokens, independent of the vocabulary."""
    from bench.memory import AllReducedBytes

    measured = {}
    for T, V in ((8, 64), (8, 640), (16, 64)):
        logits, labels, ref, cs, rs = full_case(5, torch.float32, T=T, V=V)
        x = shard_cols(logits, dist.get_rank(group), 2).clone().requires_grad_()
        with AllReducedBytes() as sent:
            safedpo_loss(x, labels, ref, cs, rs, backend="torch", vocab_group=group, validate=False).loss.backward()
        measured[T, V] = sent.bytes
    assert measured[8, 64] == measured[8, 640] > 0
    assert measured[16, 64] == 2 * measured[8, 64]


def context_cases(world):
    group, rank = one_axis(world, 1)
    p = 2
    cases = []
    for backend in BACKENDS:
        for dtype in (torch.float32, torch.bfloat16):
            def padded(backend=backend, dtype=dtype):
                logits, labels, ref, cs, rs = full_case(6, dtype, T=9)
                want, want_grad = want_loss(logits, labels, ref, cs, rs, loss_type=["hinge", "sft"], average=True)
                a, b = slice_positions(9, rank, p)
                x = logits[:, a:b].clone().requires_grad_()
                got = safedpo_loss(x, labels[:, a:b], ref, cs, rs, loss_type=["hinge", "sft"], average=True, backend=backend,
                                   context_group=group, token_stats=True)
                got.loss.backward()
                check_out(got, want, dtype)
                check_stats(got.token_stats, reference.token_stats(logits.double(), labels), dtype)
                assert rel_err(x.grad, want_grad[:, a:b]) <= TOL[dtype][1]

            cases.append((f"context padded {backend} {dtype}", padded))

        def packed(backend=backend):
            logits, labels, ref, cs, rs = full_case(7, torch.float32, T=9)
            lengths = [9, 4, 6, 1, 8, 5, 3, 9]
            pieces, piece_labels, cu, keep = [], [], [0], []
            for n, L in enumerate(lengths):
                a, b = slice_positions(L, rank, p)
                pieces.append(logits[n, a:b])
                piece_labels.append(labels[n, a:b])
                cu.append(cu[-1] + (b - a))
                keep.append((n, a, b))
            x = torch.cat(pieces).clone().requires_grad_()
            lab = torch.cat(piece_labels)
            full_labels = labels.clone()
            for n, L in enumerate(lengths):
                full_labels[n, L:] = -100
            want, want_grad = want_loss(logits, full_labels, ref, cs, rs, reduction="sum")
            got = safedpo_loss(x, lab, ref, cs, rs, cu_seqlens=torch.tensor(cu, dtype=torch.int32), reduction="sum",
                               backend=backend, context_group=group)
            got.loss.backward()
            check_out(got, want, torch.float32)
            want_rows = torch.cat([want_grad[n, a:b] for n, a, b in keep])
            assert rel_err(x.grad, want_rows) <= 1e-5

        cases.append((f"context packed {backend}", packed))

        def linear(backend=backend):
            T = 7
            mix = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3])
            hidden, weight, labels, cs, rs, want, leaves = linear_case_of(8, T=T, H=10, V=33, **mix)
            a, b = slice_positions(T, rank, p)
            h = hidden[:, a:b].clone().requires_grad_()
            w = weight.clone().requires_grad_()
            got = linear_safedpo_loss(h, w, labels[:, a:b], None, cs, rs, backend=backend, context_group=group, **mix)
            got.loss.backward()
            check_out(got, want, torch.float32)
            assert rel_err(h.grad, leaves[0].grad[:, a:b]) <= 1e-5
            # d weight: this rank's tokens' part; the parts add up to the whole.
            total = w.grad.clone()
            dist.all_reduce(total, group=group)
            assert rel_err(total, leaves[1].grad) <= 1e-5

        cases.append((f"context linear {backend}", linear))
    return cases


def mesh_cases(world):
    """4 ranks, 2 x 2: logits sharded along the vocabulary within a row, tokens sliced within a column."""
    vocab, context, vrank, crank = groups_of(world)
    cases = []
    for backend in BACKENDS:
        def both(backend=backend):
            logits, labels, ref, cs, rs = full_case(9, torch.float32, T=8)
            want, want_grad = want_loss(logits, labels, ref, cs, rs, delta=3.0)
            a, b = slice_positions(8, crank, 2)
            x = shard_cols(logits[:, a:b], vrank, 2).clone().requires_grad_()
            got = safedpo_loss(x, labels[:, a:b], ref, cs, rs, delta=3.0, backend=backend, vocab_group=vocab,
                               context_group=context, token_stats=True)
            got.loss.backward()
            check_out(got, want, torch.float32)
            check_stats(got.token_stats, reference.token_stats(logits.double(), labels), torch.float32)
            assert rel_err(x.grad, shard_cols(want_grad[:, a:b], vrank, 2)) <= 1e-5

        def both_linear(backend=backend):
            T = 6
            mix = dict(loss_type=["sft", "sigmoid"], loss_weights=[0.2, 1.0])
            hidden, weight, labels, cs, rs, want, leaves = linear_case_of(10, T=T, H=8, V=36, **mix)
            a, b = slice_positions(T, crank, 2)
            h = hidden[:, a:b].clone().requires_grad_()
            w = shard_cols(weight.t(), vrank, 2).t().clone().requires_grad_()
            got = linear_safedpo_loss(h, w, labels[:, a:b], None, cs, rs, backend=backend, vocab_group=vocab,
                                      context_group=context, **mix)
            got.loss.backward()
            check_out(got, want, torch.float32)
            assert rel_err(h.grad, leaves[0].grad[:, a:b]) <= 1e-5

        cases += [(f"mesh logits {backend}", both), (f"mesh linear {backend}", both_linear)]
    return cases


def bad_input_cases(world):
    group, rank = groups_of(world)

    def expect(words, fn):
        try:
            fn()
        except ValueError as exc:
            assert words in str(exc), str(exc)
            return
        raise AssertionError(f"no ValueError ({words})")

    logits, labels, ref, cs, rs = full_case(11, torch.float32, V=48)
    uneven = logits[..., :20] if rank == 0 else logits[..., 20:]
    past, other = labels.clone(), labels.clone()
    past[0, -1] = 48  # one label past the whole vocabulary
    other[0, -1] = 7 if labels[0, -1] != 7 else 8  # one label that differs between the ranks
    return [
        ("unequal shards", lambda: expect("unequal widths", lambda: sequence_logps(uneven, labels, vocab_group=group))),
        ("label past the vocabulary", lambda: expect(
            "outside [0, 48)", lambda: sequence_logps(shard_cols(logits, rank, 2), past, vocab_group=group))),
        ("one group for both", lambda: expect("the same process group", lambda: sequence_logps(
            shard_cols(logits, rank, 2), labels, vocab_group=group, context_group=group))),
        ("different labels per rank", lambda: expect("labels differ", lambda: sequence_logps(
            shard_cols(logits, rank, 2), other if rank else labels, vocab_group=group))),
        ("DTensor on another group", lambda: dtensor_case(group, rank, logits, labels, expect)),
    ]


def dtensor_case(group, rank, logits, labels, expect):
    """A DTensor sharded on its last dimension implies its mesh's group: the same log-probs; naming another
    group beside it is an error."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    x = distribute_tensor(logits.clone(), mesh, [Shard(2)]).requires_grad_()
    got = sequence_logps(x, labels)
    assert max_scaled_err(got, reference.sequence_logps(logits.double(), labels)) <= 1e-5
    got.sum().backward()
    full = logits.double().requires_grad_()
    reference.sequence_logps(full, labels).sum().backward()
    assert rel_err(x.grad.to_local(), shard_cols(full.grad, rank, 2)) <= 1e-5
    other = dist.new_group([0, 1])
    expect("not the process group the DTensor", lambda: sequence_logps(x, labels, vocab_group=other))


SUITES = {
    "vocab": vocab_cases,
    "context": context_cases,
    "mesh": mesh_cases,
    "bad": bad_input_cases,
}


@pytest.mark.parametrize("suite", ["vocab", "context", "bad"])
def test_two_processes(suite):
    run(2, suite)


@pytest.mark.parametrize("suite", ["vocab", "context", "mesh"])
def test_four_processes_on_a_2x2_mesh(suite):
    run(4, suite)
