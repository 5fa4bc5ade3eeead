"""labels_from_completion_mask: labels aligned with the full logits, padded (left or right) and packed."""

import pytest
import torch

from safedpo_kernels import labels_from_completion_mask, reference, sequence_logps

IGNORE = -100


def expected(ids, mask):
    """One sequence, by hand: position t predicts token t + 1 when t + 1 is a completion token."""
    return [ids[t + 1] if t + 1 < len(ids) and mask[t + 1] else IGNORE for t in range(len(ids))]


def sequences():
    # (ids, completion mask): prompt, then completion, within the sequence's own length.
    return [([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]), ([3, 4, 10], [0, 1, 1]), ([11, 12, 13, 14], [0, 0, 0, 1]),
            ([20, 21], [0, 0])]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded(side):
    seqs = sequences()
    T = max(len(s) for s, _ in seqs) + 2
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    want = torch.full((len(seqs), T), IGNORE)
    for n, (s, m) in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[n, sl], mask[n, sl], want[n, sl] = torch.tensor(s), torch.tensor(m), torch.tensor(expected(s, m))
    got = labels_from_completion_mask(ids, mask)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert torch.equal(labels_from_completion_mask(ids, mask.bool()), want)


def test_packed_segments_do_not_leak_into_each_other():
    seqs = sequences() + [([], [])]  # an empty segment too
    ids = torch.tensor([t for s, _ in seqs for t in s])
    mask = torch.tensor([t for _, m in seqs for t in m])
    cu = torch.tensor([0] + list(torch.tensor([len(s) for s, _ in seqs]).cumsum(0)), dtype=torch.int32)
    got = labels_from_completion_mask(ids, mask, cu_seqlens=cu)
    want = torch.tensor([t for s, m in seqs for t in expected(s, m)])
    assert torch.equal(got, want)
    # The first token of the next sequence is a completion token here: an unaware shift would use it.
    assert got[cu[1] - 1] == IGNORE


def test_labels_give_the_completion_log_probs():
    """With these labels, sequence_logps sums log p(completion token | everything before it)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (2, 7), generator=gen)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]])
    logits = torch.randn(2, 7, 50, generator=gen)
    got = sequence_logps(logits, labels_from_completion_mask(ids, mask))
    logp = logits.double().log_softmax(-1)
    want = [sum(logp[n, t - 1, ids[n, t]] for t in range(1, 7) if mask[n, t]) for n in range(2)]
    assert torch.allclose(got.double(), torch.stack(want), atol=1e-5)
    assert torch.allclose(got, reference.sequence_logps(logits, labels_from_completion_mask(ids, mask)).float())


@pytest.mark.parametrize(
    "args, kwargs, exc, words",
    [
        ((torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)), {}, ValueError, "completion_mask"),
        ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)), {}, TypeError, "input_ids"),
        ((torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)), {}, TypeError, "completion_mask"),
        ((torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)), {}, ValueError, "cu_seqlens"),
        ((torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)),
         dict(cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)), ValueError, "end at total_tokens=6"),
        ((torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)),
         dict(cu_seqlens=torch.tensor([0, 6], dtype=torch.int32)), ValueError, "packed"),
    ],
)
def test_bad_input_is_named(args, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        labels_from_completion_mask(*args, **kwargs)
