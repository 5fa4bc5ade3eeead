"""The fused-linear gradients being formed chunk by chunk: d hidden, d weight and d bias."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _pages
from ..parallel import all_reduce
from ..transform import LogitTransform
from ._support import no_grad_slot


class LinearHead(NamedTuple):
    """How the labels and the LM head's output are read: ignore_index, and the logit transform."""

    ignore_index: int
    transform: LogitTransform


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b, without a temporary when a and b are float32 already."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


class LinearGrads:
    """The fused-linear gradients being formed: d hidden rows (float32 or the matmul dtype), d weight and
    d bias accumulated in float32 in a fixed order (chunk after chunk: deterministic)."""

    def __init__(self, rows: int, V: int, H: int, hidden, need_h: bool, need_w: bool, need_b: bool, vocab=None):
        device = hidden.device
        # A vocabulary shard's d hidden is a part of a sum over the shards: float32 until it is complete.
        dtype = torch.float32 if vocab is not None else hidden.dtype
        self.hidden = torch.zeros(rows, H, dtype=dtype, device=device) if need_h else None
        self.weight = _pages.zeros((V, H), torch.float32, device) if need_w else None
        self.bias = torch.zeros(V, dtype=torch.float32, device=device) if need_b else None

    def add(self, dz: torch.Tensor, h: torch.Tensor, w: torch.Tensor, rows: torch.Tensor) -> None:
        """Fold d loss / d logits ``dz`` of the rows ``rows`` (whose hidden states are ``h``) in:
        d hidden[rows] = dz @ w, d weight += dz.T @ h, d bias += the column sums of dz."""
        if self.hidden is not None:
            self.hidden.index_copy_(0, rows, (dz @ w).to(self.hidden.dtype))
        if self.weight is not None:
            _accumulate_product(self.weight, dz.t(), h.to(dz.dtype))
        if self.bias is not None:
            self.bias += dz.sum(dim=0, dtype=torch.float32)

    def complete_hidden(self, vocab) -> None:
        """Each vocabulary shard formed its part of d hidden: add them up over the ``vocab`` group."""
        if vocab is not None and self.hidden is not None:
            all_reduce(self.hidden, vocab)

    def recompute(self, kernels, h, w, b, lab, lse, g, rows, head) -> None:
        """The gradients of rows whose logits were not kept, recomputed a chunk of rows at a time: ``h``,
        ``lab`` (the kernels' labels), ``lse`` and ``g`` (d loss / d token log-prob) of the rows ``rows``,
        the prepared head ``w``, ``b``, read as ``head`` (a LinearHead) says."""
        chunk = kernels.dlogits_chunk_rows(w.shape[0], h.dtype, h.device)
        scale, cap = head.transform.logit_scale, head.transform.softcap
        for r0 in range(0, h.shape[0], chunk):
            r1 = min(r0 + chunk, h.shape[0])
            dz = kernels.linear_dlogits(h[r0:r1], w, b, lab[r0:r1], lse[r0:r1], g[r0:r1], head.ignore_index, scale, cap)
            self.add(dz, h[r0:r1], w, rows[r0:r1])
            del dz

    def results(self, specs) -> tuple:
        """(d hidden, d weight, d bias) in their inputs' (shape, dtype) ``specs``."""
        return tuple(None if g is None else g.to(spec[1]).view(spec[0])
                     for g, spec in zip((self.hidden, self.weight, self.bias), specs))


def fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias) -> tuple:
    return (hidden.new_empty(hidden.shape) if need_hidden else no_grad_slot(hidden),
            weight.new_empty(weight.shape) if need_weight else no_grad_slot(hidden),
            bias.new_empty(bias.shape) if need_bias and bias is not None else no_grad_slot(hidden))
