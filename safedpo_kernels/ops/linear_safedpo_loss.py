"""safedpo::linear_safedpo_loss: the SafeDPO loss from hidden states and the LM head, with its gradients
formed in the forward (3 matmuls over the tokens), its fake and its autograd formula (a scaling of the
formed gradients by the upstream scalar)."""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from .. import _pages
from .._layout import Layout
from ..chunking import PairChunk, loss_chunk_rows, plan_pair_chunks
from ..dispatch import backend_module
from ..loss import Pairs, loss_and_logp_grad, loss_denominators, loss_from_logps
from ..options import LossOptions
from ..parallel import Groups, resolve
from ..reductions import (
    combined_token_logps,
    kernel_labels,
    layout_of,
    n_seq,
    row_token_counts,
    sequence_statistics,
    sequence_values,
    token_grads,
)
from ..transform import LogitTransform
from ._support import first_order_only, no_autocast, no_grad_slot, nones, specs
from .grads import LinearGrads, LinearHead, fake_grads


@torch.library.custom_op("safedpo::linear_safedpo_loss", mutates_args=())
def linear_safedpo_loss_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                           ref_logps: Optional[torch.Tensor], chosen_safe: torch.Tensor, rejected_safe: torch.Tensor,
                           cu_seqlens: Optional[torch.Tensor], ignore_index: int, logit_scale: float,
                           softcap: Optional[float], beta: float, delta: float, swap: bool, drop_both_unsafe: bool,
                           label_smoothing: float, loss_type: str, reduction: str, average: bool,
                           loss_weights: List[float], denominators: Optional[torch.Tensor], stats: bool, backend: str,
                           need_hidden: bool, need_weight: bool, need_bias: bool, vocab_group: str = "",
                           context_group: str = "") -> List[torch.Tensor]:
    """The SafeDPO loss from hidden states and the LM head, with its gradients formed in the forward.

    A pair's loss depends only on that pair's two log-probs (and its reference log-probs and flags),
    and the number of kept pairs is known from the flags before anything is computed. So the pairs are
    processed in chunks (chosen row i with rejected row B + i): the chunk's logits (one matmul), its
    log-probs, its loss and d loss / d log-prob, d loss / d logits in place, then d hidden = dz @ W and
    d weight += dz.T @ h (two more matmuls), and the chunk is freed: 3 matmuls over the tokens instead of
    the 4 of a design that recomputes the logits in backward. The autograd formula only scales the
    gradients by the upstream gradient (a scalar). Gradients are formed only for the inputs that need
    them (``need_*``). A pair whose logits alone exceed the chunk budget is computed in two passes
    (log-probs, then recomputed gradients), which keeps memory bounded at any sequence length.

    A "mean" reduction's divisors (the kept pairs, the tokens of their preferred responses for "sft")
    are the whole call's, or ``denominators``: every chunk's loss is its share, and so are its gradients.
    The chunk plan reads the per-pair token counts on the host: one synchronization per call on a GPU
    (inside the op: a compiled step has no graph break). ``loss_type`` is the names joined by commas.

    With ``stats`` the same pass also sums each sequence's token statistics (see sequence_logps).

    Returns [loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, kept, swapped,
    loss_terms, token statistics (2B, 4) ((0, 4) unless ``stats``), d hidden, d weight, d bias] (empty
    gradients where not needed).
    """
    options = LossOptions.from_op_args(beta, delta, swap, drop_both_unsafe, label_smoothing, loss_type, reduction,
                                       average, loss_weights)
    head = LinearHead(ignore_index, LogitTransform(logit_scale, softcap))
    layout = layout_of(hidden, cu_seqlens)
    kernels = backend_module(backend)
    groups = Groups(resolve(vocab_group), resolve(context_group))
    device, V = hidden.device, weight.shape[0]
    B = layout.n_seq // 2
    wants = (need_hidden, need_weight, need_bias and bias is not None)
    with no_autocast():
        w, b = kernels.prepare_weight(weight, bias, hidden.dtype)
        flat = hidden.reshape(layout.rows, hidden.shape[-1])
        grads = LinearGrads(layout.rows, V, hidden.shape[-1], hidden, *wants, groups.vocab) if any(wants) else None
        counts = row_token_counts(labels, layout, head.ignore_index, groups.context)
        if options.reduction == "mean" and denominators is None:  # the whole call's divisors, for every chunk
            denominators = torch.stack(loss_denominators(counts, chosen_safe, rejected_safe, options))
        ref = torch.zeros(2 * B, dtype=torch.float32, device=device) if ref_logps is None else ref_logps.float()
        chunks = _PairChunks(kernels, flat, w, b, labels, Pairs(ref, chosen_safe, rejected_safe, denominators), counts,
                             options, head, loss_chunk_rows(V, device), grads, groups, stats)
        total = torch.zeros((), dtype=torch.float64, device=device)
        terms = torch.zeros(len(options.terms), dtype=torch.float64, device=device)
        row_stats = torch.zeros(2 * B if stats else 0, 4, dtype=torch.float32, device=device)
        metrics = []
        for chunk in plan_pair_chunks(counts, layout, labels, head.ignore_index, chunks.budget):
            out, chunk_stats = chunks.loss(chunk)
            if stats:
                row_stats.index_copy_(0, chunk.sequences, chunk_stats)
            total += out.loss.detach().double()
            terms += out.loss_terms.double()
            metrics.append([m.detach() for m in out[1:7]])
        loss = total.float()
        if grads is not None:
            grads.complete_hidden(groups.vocab)
        results = grads.results(specs(hidden, weight, bias)) if grads is not None else (None, None, None)
    metrics = [torch.cat(m) for m in zip(*metrics)]
    return [loss, *metrics, terms.float(), row_stats, *(no_grad_slot(hidden) if g is None else g for g in results)]


@linear_safedpo_loss_op.register_fake
def _(hidden, weight, bias, labels, ref_logps, chosen_safe, rejected_safe, cu_seqlens, ignore_index, logit_scale,
      softcap, beta, delta, swap, drop_both_unsafe, label_smoothing, loss_type, reduction, average, loss_weights,
      denominators, stats, backend, need_hidden, need_weight, need_bias, vocab_group="", context_group=""):
    B = n_seq(hidden, cu_seqlens) // 2
    f32 = dict(dtype=torch.float32, device=hidden.device)
    flags = dict(dtype=torch.bool, device=hidden.device)
    return [hidden.new_empty((), **f32), *(hidden.new_empty(B, **f32) for _ in range(4)), hidden.new_empty(B, **flags),
            hidden.new_empty(B, **flags), hidden.new_empty(len(loss_type.split(",")), **f32),
            hidden.new_empty(2 * B if stats else 0, 4, **f32),
            *fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)]


def _linear_loss_setup(ctx, inputs, output):
    # Only the loss is differentiable: the metrics carry no gradient (the contract), and the formed
    # gradients are the backward's inputs.
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[9:])
    ctx.consumed = False


@first_order_only
def _linear_loss_backward(ctx, grad_outputs):
    grad_loss = grad_outputs[0]  # the metrics and the formed gradients carry none back
    if ctx.consumed:
        raise RuntimeError(
            "linear_safedpo_loss: its gradients were formed in the forward and consumed by the first backward; "
            "a second backward through the same graph (retain_graph=True) is not supported"
        )
    ctx.consumed = True
    need = ctx.needs_input_grad[:3]
    grads = []
    # Scaled into new tensors, not in place: the formed gradients are the op's outputs, which stay as they
    # were (a traced graph and opcheck rely on that). The saved ones go when this backward returns, so the
    # copy is transient, and smaller than the forward's chunk of logits.
    for g, n in zip(ctx.saved_tensors, need):
        grads.append(torch.mul(g, grad_loss.to(g.dtype), out=_pages.empty(g.shape, g.dtype, g.device)) if n else None)
    return (*grads, *nones(ctx, 3))


linear_safedpo_loss_op.register_autograd(_linear_loss_backward, setup_context=_linear_loss_setup)


class _PairChunks(NamedTuple):
    """What every chunk of pairs of one call shares: the backend, the flat hidden states, the prepared head
    (``w``, ``b``), the flat labels, the pairs' reference log-probs, flags and the whole call's divisors,
    the (2B,) token counts, the options, how the head is read, the chunk budget in rows, the gradients
    being formed (None: the loss only), the groups, and whether token statistics are summed too."""

    kernels: object
    flat: torch.Tensor
    w: torch.Tensor
    b: Optional[torch.Tensor]
    labels: torch.Tensor
    pairs: Pairs
    counts: torch.Tensor
    options: LossOptions
    head: LinearHead
    budget: int
    grads: Optional[LinearGrads]
    groups: Groups
    stats: bool

    def loss(self, chunk: PairChunk):
        """One chunk of pairs: its logits, log-probs and loss (its share of the call's loss: the call's
        divisors), and, when gradients are being formed, its gradients folded in. Vocabulary shards
        combine their token statistics, context slices their sequences' sums; every rank gets the
        chunk's loss. Returns (SafeDPOOutput, the chunk's sequences' token statistics (2P, 4) or None)."""
        kernels, head, w, b = self.kernels, self.head, self.w, self.b
        h = self.flat.index_select(0, chunk.rows)
        lab = self.labels.index_select(0, chunk.rows)
        rows = chunk.rows.numel()
        flat_layout = Layout.single(rows)
        two_pass = rows > self.budget
        scale, cap = head.transform.logit_scale, head.transform.softcap
        z = None

        def forward(local, stats):
            nonlocal z
            if two_pass:
                return kernels.linear_forward(h, w, b, local, head.ignore_index, scale, cap, stats)
            z = kernels.linear_logits(h, w, b, scale, cap)
            return kernels.logp_forward(z, local, flat_layout, head.ignore_index, stats)

        tok, lse, *tstats = combined_token_logps(forward, lab, w.shape[0], head.ignore_index, self.groups.vocab,
                                                 self.stats)
        every = torch.ones(rows, dtype=torch.bool, device=h.device)  # the chunk holds counted tokens only
        logps, count = sequence_values(tok, every, chunk.layout, self.options.average, self.groups.context)
        chunk_stats = sequence_statistics(tstats[0], every, chunk.layout, self.groups.context) if self.stats else None
        pair = (self.pairs.ref_logps.index_select(0, chunk.sequences), self.pairs.chosen_safe[chunk.p0:chunk.p1],
                self.pairs.rejected_safe[chunk.p0:chunk.p1], self.options, self.counts.index_select(0, chunk.sequences),
                self.pairs.denominators)
        if self.grads is None:
            return loss_from_logps(logps, *pair), chunk_stats
        out, dlogp = loss_and_logp_grad(logps, *pair)  # inside an op autograd does not record
        if rows == 0:
            return out, chunk_stats
        g = token_grads(dlogp.double(), every, count, chunk.layout, self.options.average)
        local = kernel_labels(lab, w.shape[0], head.ignore_index, self.groups.vocab)
        if two_pass:
            self.grads.recompute(kernels, h, w, b, local, lse, g, chunk.rows, head)
            return out, chunk_stats
        # d loss / d z0 = scale * d loss / d z (times the softcap derivative, which the kernel applies).
        dz = z if w.dtype == z.dtype else torch.empty(z.shape, dtype=w.dtype, device=z.device)
        kernels.logp_backward(z, local, lse, g * scale, dz, flat_layout, head.ignore_index, cap)
        self.grads.add(dz, h.to(w.dtype), w, chunk.rows)
        return out, chunk_stats
