"""Where the token rows of logits or hidden states live in memory: ``Layout``, shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Layout:
    """Where token ``r`` (0 <= r < rows) of the flattened token axis lives in memory.

    Padded (N, T, V) inputs are addressed as ``(r // T) * stride_seq + (r % T) * stride_tok``; packed
    (total, V) inputs as one "sequence" of length ``rows`` (``T = rows``, ``stride_seq = 0``). This lets
    the kernels read a shifted view such as ``logits[:, :-1]`` without first copying it.
    """

    n_seq: int  # N: number of sequences (rows of the output)
    rows: int  # number of token rows = N * T (padded) or total_tokens (packed)
    seq_len: int  # T for the padded layout, ``rows`` for the packed one
    padded: bool
    cu_seqlens: Optional[torch.Tensor]  # int64 (N + 1,) on the logits' device, packed layout only

    def row_strides(self, x: torch.Tensor):
        """(stride_seq, stride_tok) in elements of x's token rows, as the kernels address them."""
        return (x.stride(0), x.stride(1)) if self.padded else (0, x.stride(0))

    @classmethod
    def packed(cls, cu_seqlens: torch.Tensor, rows: int) -> "Layout":
        """Sequences n = 0..N-1 at rows [cu_seqlens[n], cu_seqlens[n + 1]) of a (rows, ...) tensor."""
        return cls(n_seq=cu_seqlens.numel() - 1, rows=rows, seq_len=rows, padded=False, cu_seqlens=cu_seqlens)

    @classmethod
    def single(cls, rows: int) -> "Layout":
        """All ``rows`` as one sequence (a chunk of token rows that the kernels treat as a flat list)."""
        return cls(n_seq=1, rows=rows, seq_len=max(rows, 1), padded=False, cu_seqlens=None)
