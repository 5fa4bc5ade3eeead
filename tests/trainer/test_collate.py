"""safedpo/collate.py: batches of similar lengths, deterministic and resumable; padded and packed batches
hold the same tokens and labels."""

import random

import pytest
import torch

from safedpo.collate import batch_stream, bucketed_batches, collate_packed, collate_padded
from safedpo.data import Example


def test_an_epoch_is_a_permutation_in_full_batches_of_similar_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(203)]
    batches = bucketed_batches(lengths, batch_size=4, seed=3, epoch=0, bucket=8)
    flat = [i for b in batches for i in b]
    assert len(batches) == 203 // 4 and all(len(b) == 4 for b in batches) and len(set(flat)) == len(flat)
    assert batches == bucketed_batches(lengths, 4, 3, 0, 8) and batches != bucketed_batches(lengths, 4, 3, 1, 8)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 0.25 * (max(lengths) - min(lengths)), spread  # sorted inside each window: little padding


def test_the_stream_resumes_at_any_position_across_epochs():
    lengths = list(range(3, 40))
    stream = batch_stream(lengths, 5, seed=1)
    straight = [next(stream) for _ in range(20)]  # 7 batches an epoch: crosses two epochs
    assert [p for p, _ in straight] == list(range(20))
    again = batch_stream(lengths, 5, seed=1, start=9)
    assert [next(again) for _ in range(11)] == straight[9:]
    with pytest.raises(ValueError, match="fewer examples"):
        next(batch_stream([3, 4], 5, seed=0))


def test_padded_and_packed_batches_hold_the_same_tokens_and_labels():
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 50, (n,), generator=g).tolist()

    examples = [Example(ids(3 + i), ids(2 + 3 * i), ids(5 - i), bool(i % 2), True) for i in range(3)]
    padded, packed = collate_padded(examples, pad_id=0), collate_packed(examples)
    N = 2 * len(examples)
    cu = packed["cu_seqlens"].tolist()
    assert len(cu) == N + 1 and cu[0] == 0 and cu[-1] == packed["input_ids"].numel()
    for r in range(N):
        n = cu[r + 1] - cu[r]
        row = padded["attention_mask"][r].bool()
        assert padded["input_ids"][r][row].tolist() == packed["input_ids"][0, cu[r]:cu[r + 1]].tolist()
        assert padded["labels"][r][row].tolist() == packed["labels"][cu[r]:cu[r + 1]].tolist()
        assert packed["position_ids"][0, cu[r]:cu[r + 1]].tolist() == list(range(n))
    # the responses' tokens count, the prompts' do not: chosen rows first, then rejected
    counted = (padded["labels"] != -100).sum(1).tolist()
    assert counted == [len(e.chosen_ids) for e in examples] + [len(e.rejected_ids) for e in examples]
    assert padded["chosen_safe"].tolist() == [e.chosen_safe for e in examples]
