"""How linear_safedpo_loss cuts a batch into chunks of whole pairs within its logits budget."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._env import float32_rows, linear_chunk_bytes
from ._layout import Layout
from .reductions import sequence_ids


def pair_runs(rows_per_pair: list, budget_rows: int) -> list:
    """Consecutive runs of pairs [p0, p1) whose counted rows fit in ``budget_rows``; a pair that alone
    exceeds it is a run of its own (computed in two passes)."""
    runs, p0, used = [], 0, 0
    for p, n in enumerate(rows_per_pair):
        if p > p0 and used + n > budget_rows:
            runs.append((p0, p))
            p0, used = p, 0
        used += n
    runs.append((p0, len(rows_per_pair)))
    return runs


class PairChunk(NamedTuple):
    """One chunk of pairs [p0, p1) of linear_safedpo_loss: the counted token rows of its 2P sequences
    (chosen p0..p1-1, then rejected B+p0..B+p1-1, each sequence one run, in row order), their layout as
    2P packed sequences, and which of the (2B,) sequences they are."""

    p0: int
    p1: int
    rows: torch.Tensor
    layout: Layout
    sequences: torch.Tensor


def plan_pair_chunks(counts: torch.Tensor, layout: Layout, labels: torch.Tensor, ignore_index: int,
                     budget_rows: int) -> list:
    """Split the pairs into chunks of at most ``budget_rows`` counted tokens (a pair larger than that is
    a chunk alone), from the (2B,) token counts of the sequences (``row_token_counts``: with a context
    group, added up over it, so that every rank cuts the same chunks of pairs, each of its own tokens).
    Reads the per-pair counts on the host (one sync): the chunk sizes are Python ints that size the
    chunks' buffers."""
    device = labels.device
    B = layout.n_seq // 2
    idx = (labels != ignore_index).nonzero().squeeze(1)
    seq = sequence_ids(layout, device).index_select(0, idx)
    pair = seq % B
    runs = pair_runs((counts[:B] + counts[B:]).tolist(), budget_rows)
    run_of_pair = torch.repeat_interleave(torch.arange(len(runs), device=device),
                                          torch.tensor([p1 - p0 for p0, p1 in runs], device=device))
    run_of_tok = run_of_pair.index_select(0, pair)
    # A stable sort by chunk keeps row order inside each: the chosen sequences' runs, then the rejected'.
    order = torch.argsort(run_of_tok, stable=True)
    idx, seq = idx.index_select(0, order), seq.index_select(0, order)
    ends = torch.bincount(run_of_tok, minlength=len(runs)).cumsum(0).tolist()
    chunks, start = [], 0
    for (p0, p1), end in zip(runs, ends):
        s_c = seq[start:end]
        P = p1 - p0
        local = torch.where(s_c < B, s_c - p0, s_c - B - p0 + P)  # 0..2P-1, non-decreasing
        cu = torch.cat([local.new_zeros(1), torch.bincount(local, minlength=2 * P).cumsum(0)])
        sequences = torch.cat([torch.arange(p0, p1, device=device), torch.arange(B + p0, B + p1, device=device)])
        chunks.append(PairChunk(p0, p1, idx[start:end], Layout.packed(cu, end - start), sequences))
        start = end
    return chunks


def loss_chunk_rows(V: int, device: torch.device) -> int:
    """Token rows per chunk of pairs in linear_safedpo_loss: float32 logits within
    SAFEDPO_LINEAR_CHUNK_BYTES (see _env.py)."""
    return float32_rows(linear_chunk_bytes(device), V)
