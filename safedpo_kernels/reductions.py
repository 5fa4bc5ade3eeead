"""The O(tokens) reductions every op shares: per-token values summed per sequence (padded or packed, in
a fixed order: deterministic), d loss / d logp spread back over the tokens, and the token log-probs of
a vocabulary shard combined over its group."""

from __future__ import annotations

from typing import Optional

import torch

from ._layout import Layout
from .parallel import all_reduce, combine_vocab, combine_vocab_stats, local_labels, vocab_shard


def segment_sums(tok: torch.Tensor, counted: torch.Tensor, layout: Layout):
    """Per-sequence sums of per-token values (float64 accumulation, fixed order) and token counts."""
    if layout.padded:
        N, T = layout.n_seq, layout.seq_len
        return tok.view(N, T).sum(1, dtype=torch.float64), counted.view(N, T).sum(1)
    cu = layout.cu_seqlens

    def differenced(values):  # a prefix sum (a deterministic scan) differenced at the boundaries: no atomics
        csum = torch.cat([values.new_zeros(1), values.cumsum(0)])
        return csum[cu[1:]] - csum[cu[:-1]]

    # Only finite values enter the float64 scan: a NaN or an infinity there would turn every later
    # sequence's difference into NaN. They are counted instead and put back into their own sequences.
    finite = torch.isfinite(tok)
    sums = differenced(torch.where(finite, tok, torch.zeros_like(tok)).double())
    # (Always, not behind a check of the values: that would synchronize the host with the device.)
    nan, pos, neg = (differenced(m.long()) > 0 for m in (torch.isnan(tok), tok == float("inf"), tok == float("-inf")))
    sums = torch.where(neg, float("-inf"), torch.where(pos, float("inf"), sums))
    sums = torch.where(nan | (pos & neg), float("nan"), sums)
    return sums, differenced(counted.long())


def sequence_values(tok: torch.Tensor, counted: torch.Tensor, layout: Layout, average: bool, context=None):
    """(N,) float32 sequence log-probs (sums, or means over counted tokens) and the (N,) token counts;
    with a ``context`` group, each rank's partial sums and counts are added up over it first."""
    seq, count = segment_sums(tok, counted, layout)
    if context is not None:
        seq, count = all_reduce(seq, context), all_reduce(count, context)
    if average:
        seq = seq / count.clamp(min=1)
    return seq.to(torch.float32), count


def token_grads(grad_seq: torch.Tensor, counted: torch.Tensor, count: torch.Tensor, layout: Layout, average: bool):
    """Spread each sequence's d loss / d logp over its counted tokens: (rows,) float32."""
    g = grad_seq.to(torch.float64)
    if average:
        g = g / count.clamp(min=1)
    g = g.to(torch.float32)
    if layout.padded:
        g_tok = g.repeat_interleave(layout.seq_len)
    else:
        lengths = layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]
        g_tok = g.repeat_interleave(lengths, output_size=layout.rows)
    return torch.where(counted, g_tok, torch.zeros_like(g_tok))


def row_token_counts(labels: torch.Tensor, layout: Layout, ignore_index: int, context=None) -> torch.Tensor:
    """(N,) int64 counted tokens of each sequence, added up over the ``context`` group when given."""
    counted = (labels != ignore_index).nonzero().squeeze(1)
    counts = torch.bincount(sequence_ids(layout, labels.device).index_select(0, counted), minlength=layout.n_seq)
    return counts if context is None else all_reduce(counts, context)


def layout_of(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> Layout:
    """The token layout of logits or hidden states: padded (N, T, ...) or packed (total, ...) with cu_seqlens."""
    if cu_seqlens is None:
        N, T = x.shape[0], x.shape[1]
        return Layout(n_seq=N, rows=N * T, seq_len=T, padded=True, cu_seqlens=None)
    return Layout.packed(cu_seqlens.to(torch.int64), x.shape[0])


def combined_token_logps(forward, labels: torch.Tensor, width: int, ignore_index: int, vocab, stats: bool = False):
    """(token log-probs, log-sum-exps) of ``forward(kernel labels, stats)`` -- a backend's logp_forward or
    linear_forward over this rank's ``width`` vocabulary columns -- combined over the ``vocab`` group;
    with ``stats`` also the (rows, 3) float32 token statistics (``token_statistics``)."""
    shard = vocab_shard(vocab, width)
    local, in_shard = local_labels(labels, shard, ignore_index)
    out = forward(local, stats)
    tok, lse = out[0], out[1]
    if shard is not None:
        tok, lse_all = combine_vocab(tok, lse, labels, in_shard, shard, ignore_index, vocab)
        st = combine_vocab_stats(out[2], lse, lse_all, labels, in_shard, shard, vocab) if stats else None
        lse = lse_all
    else:
        st = out[2] if stats else None
    if not stats:
        return tok, lse
    return tok, lse, token_statistics(st, lse, labels, ignore_index, width if shard is None else shard.total)


def token_statistics(st: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                     vocab: int) -> torch.Tensor:
    """(rows, 3) float32 per counted token (0 elsewhere), from the kernels' (rows, STATS) statistics over
    the whole vocabulary: the entropy of the predicted distribution (lse - sum_v p_v z_v), the mean logit
    over the ``vocab`` columns, and 1.0 where the label is the top-1 prediction (its logit is the maximum
    and no earlier column reaches it: the lowest index of the maximum)."""
    counted = labels != ignore_index
    valid = counted & (labels >= 0) & (labels < vocab)
    entropy = lse - st[:, 0]
    mean = st[:, 1] / vocab
    top1 = (valid & (st[:, 4] >= st[:, 2]) & (st[:, 4] > st[:, 3])).to(torch.float32)
    out = torch.stack([entropy, mean, top1], dim=1)
    return torch.where(counted[:, None], out, torch.zeros_like(out))


def sequence_statistics(tstats: torch.Tensor, counted: torch.Tensor, layout: Layout, context=None) -> torch.Tensor:
    """(N, 4) float32: each sequence's sums of the (rows, 3) per-token statistics over its counted tokens
    (float64 accumulation, fixed order) and its counted tokens, added up over the ``context`` group: the
    columns of a ``TokenStats``."""
    parts = [segment_sums(tstats[:, k].contiguous(), counted, layout) for k in range(tstats.shape[1])]
    sums = torch.stack([s for s, _ in parts] + [parts[0][1].to(torch.float64)], dim=1)
    if context is not None:
        sums = all_reduce(sums, context)
    return sums.to(torch.float32)


def kernel_labels(labels: torch.Tensor, width: int, ignore_index: int, vocab) -> torch.Tensor:
    """The labels a backward kernel reads on this rank (its shard's columns; others match none)."""
    return local_labels(labels, vocab_shard(vocab, width), ignore_index)[0]


def n_seq(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> int:
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def sequence_ids(layout: Layout, device) -> torch.Tensor:
    """(rows,) int64: the sequence each token row belongs to."""
    if layout.padded:
        return torch.arange(layout.rows, device=device) // layout.seq_len
    lengths = layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]
    return torch.arange(layout.n_seq, device=device).repeat_interleave(lengths, output_size=layout.rows)
