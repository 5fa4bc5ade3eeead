"""Batches in the kernels' layout (chosen rows, then rejected rows) and a length-bucketing sampler.

Padded batch (SDPA): input_ids / attention_mask (2B, L), right padded; labels (2B, L) aligned with the
model's full logits (labels[:, t] = input_ids[:, t + 1]), -100 on prompt, padding and the last position.
Aligning with the full logits, not logits[:, :-1], lets the in-place backward hand the logits' own
memory straight to the LM head (a slice would make autograd allocate a full-size gradient).
Packed batch (flash-attention varlen, no padding): input_ids / position_ids (1, total) with positions
restarting at each sequence, labels (total,) with -100 on prompt tokens and on each sequence's last
token (it predicts nothing), cu_seqlens int32 (2B + 1,).
"""

from __future__ import annotations

import random
from typing import Iterator, List, Sequence

import torch

from .data import Example

IGNORE = -100


def _sequences(examples: Sequence[Example]):
    """(ids, n_prompt) for the chosen rows then the rejected rows."""
    chosen = [(e.prompt_ids + e.chosen_ids, len(e.prompt_ids)) for e in examples]
    rejected = [(e.prompt_ids + e.rejected_ids, len(e.prompt_ids)) for e in examples]
    return chosen + rejected


def _flags(examples: Sequence[Example]) -> dict:
    return dict(
        chosen_safe=torch.tensor([e.chosen_safe for e in examples], dtype=torch.bool),
        rejected_safe=torch.tensor([e.rejected_safe for e in examples], dtype=torch.bool),
    )


def response_labels(ids: Sequence[int], n_prompt: int) -> List[int]:
    """Labels aligned with the full logits (position t predicts token t + 1): the response tokens
    ids[n_prompt:] at positions n_prompt - 1 .. len - 2, IGNORE elsewhere (prompt and last position)."""
    labels = [IGNORE] * len(ids)
    start = max(n_prompt, 1)
    labels[start - 1 : len(ids) - 1] = ids[start:]
    return labels


def pad_sequences(seqs: Sequence[tuple], pad_id: int) -> dict:
    """(ids, n_prompt) sequences -> right-padded input_ids, attention_mask and labels (n, L), int64."""
    L = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), L), dtype=torch.long)
    labels = torch.full((len(seqs), L), IGNORE, dtype=torch.long)
    for n, (ids, n_prompt) in enumerate(seqs):
        input_ids[n, : len(ids)] = torch.tensor(ids)
        attention_mask[n, : len(ids)] = 1
        labels[n, : len(ids)] = torch.tensor(response_labels(ids, n_prompt))
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def collate_padded(examples: Sequence[Example], pad_id: int) -> dict:
    return dict(**pad_sequences(_sequences(examples), pad_id), **_flags(examples))


def collate_packed(examples: Sequence[Example]) -> dict:
    seqs = _sequences(examples)
    ids_all, pos_all, lab_all, cu = [], [], [], [0]
    for ids, n_prompt in seqs:
        ids_all += ids
        pos_all += list(range(len(ids)))
        lab_all += response_labels(ids, n_prompt)
        cu.append(cu[-1] + len(ids))
    return dict(
        input_ids=torch.tensor([ids_all]),
        position_ids=torch.tensor([pos_all]),
        labels=torch.tensor(lab_all),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        **_flags(examples),
    )


def token_counts(batch: dict) -> torch.Tensor:
    """(2B,) int64: each row's counted (response) tokens, padded or packed."""
    counted = (batch["labels"] != IGNORE).long()
    if "cu_seqlens" not in batch:
        return counted.sum(-1)
    cu = batch["cu_seqlens"].long()
    csum = torch.cat([counted.new_zeros(1), counted.cumsum(0)])
    return csum[cu[1:]] - csum[cu[:-1]]


def make_batch(examples, indices, pad_id: int, packed: bool, device) -> dict:
    """The batch of ``examples[indices]`` (packed or padded) on ``device``, with their indices and each
    row's counted tokens (``token_counts``)."""
    chunk = [examples[i] for i in indices]
    batch = collate_packed(chunk) if packed else collate_padded(chunk, pad_id)
    batch["token_counts"] = token_counts(batch)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["index"] = torch.tensor(indices, device=device)
    return batch


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket: int = 32) -> List[List[int]]:
    """Global batches of example indices for one epoch, deterministic in (seed, epoch).

    Indices are shuffled, cut into windows of ``bucket`` batches, sorted by length inside each window (so
    a batch holds examples of similar length and little padding), cut into batches, and the batches
    shuffled. The last incomplete batch is dropped so that every step sees ``batch_size`` pairs.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    window = batch_size * bucket
    for w0 in range(0, len(order), window):
        chunk = sorted(order[w0 : w0 + window], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    return batches


def batch_stream(lengths: Sequence[int], batch_size: int, seed: int, start: int = 0) -> Iterator[tuple]:
    """Endless (position, batch) over epochs; position = (epoch, index in epoch), resumable at ``start``."""
    n_per_epoch = len(bucketed_batches(lengths, batch_size, seed, 0))
    if n_per_epoch == 0:
        raise ValueError(f"fewer examples ({len(lengths)}) than one global batch ({batch_size})")
    epoch, index = divmod(start, n_per_epoch)
    while True:
        batches = bucketed_batches(lengths, batch_size, seed, epoch)
        for i in range(index, len(batches)):
            yield epoch * n_per_epoch + i, batches[i]
        epoch, index = epoch + 1, 0
