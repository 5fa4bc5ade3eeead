"""The kernels' entry points as torch.library custom ops (namespace ``safedpo``), their autograd formulas,
and the O(tokens) reductions they share.

Each op is opaque to torch.compile -- a compiled training step calls it as one node, with no graph break
-- and has a fake implementation (output shapes from input shapes) and a registered autograd formula:

    safedpo::sequence_logps          logits -> (N,) log-probs, per-token log-sum-exp, token counts
    safedpo::sequence_logps_grad     its backward into a new buffer
    safedpo::sequence_logps_grad_    its backward written into the logits (in-place backward)
    safedpo::linear_sequence_logps   hidden states and LM head -> the same, logits never materialized
    safedpo::linear_sequence_logps_grad   its backward (logits recomputed chunk by chunk)
    safedpo::linear_safedpo_loss     the SafeDPO loss from hidden states, gradients formed in the forward

Each forward asks a backend (see ``dispatch.Backend``) for per-token log-probs and log-sum-exps, reduces
them per sequence in a fixed order and keeps only O(tokens) values; each backward turns the sequences'
d loss / d logp into d loss / d logits through the same backend. The logits ops read sizes from shapes
only: no host synchronization. linear_safedpo_loss plans its chunks from the per-pair token counts, which
it reads on the host (inside the op, so a compiled step still has no graph break).
"""

from __future__ import annotations

import contextlib
import functools
from typing import List, NamedTuple, Optional, Tuple

import torch

from ._env import linear_chunk_bytes
from ._layout import Layout
from .dispatch import backend_module
from .loss import loss_and_logp_grad, loss_from_logps, safety_transform
from .options import LossOptions
from .parallel import Groups, all_reduce, combine_vocab, local_labels, resolve, vocab_shard


def first_order_only(backward):
    """The kernels' backward passes are first-order: under create_graph=True (a second derivative on the
    way) raise a clear error at once, rather than return gradients without a graph."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "safedpo_kernels computes first-order gradients only: backward with create_graph=True (for second "
                "derivatives) is not supported"
            )
        return backward(ctx, *grads)

    return wrapper


def autocast_off(method):
    """Run a forward or backward with autocast switched off. The kernels take their inputs in the
    dtypes they come in and choose their own precision (float32 logits and accumulation); under an
    ambient autocast (a trainer's bf16 mixed precision) the chunked matmuls of the CPU backends would
    otherwise produce bfloat16 logits, which moves a log-prob by ~|z| / 256 per token."""

    @functools.wraps(method)
    def wrapper(ctx, *args):
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda"):
                if _autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return method(ctx, *args)

    return wrapper


@contextlib.contextmanager
def no_autocast():
    """``autocast_off`` as a context manager (for the ops' implementations)."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if _autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _autocast_enabled(device: str) -> bool:
    try:
        return torch.is_autocast_enabled(device)
    except TypeError:  # torch without the device_type argument
        return torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()


def autocast_operands(*tensors):
    """Inside torch.autocast, the LM head's matmul operands (hidden, weight, bias) in autocast's dtype,
    as autocast would hand them to F.linear -- differentiably, so a float32 weight still gets a float32
    gradient; outside it, or for a device autocast does not cover, the tensors unchanged. The kernels
    then keep the logits in float32, where autocast would have rounded them."""
    device = tensors[0].device.type
    if device not in ("cpu", "cuda") or not _autocast_enabled(device):
        return tensors
    try:
        dtype = torch.get_autocast_dtype(device)
    except AttributeError:  # older torch
        dtype = torch.get_autocast_cpu_dtype() if device == "cpu" else torch.get_autocast_gpu_dtype()
    return tuple(t if t is None or t.dtype in (dtype, torch.float64) else t.to(dtype) for t in tensors)


def segment_sums(tok: torch.Tensor, counted: torch.Tensor, layout: Layout):
    """Per-sequence sums of per-token values (float64 accumulation, fixed order) and token counts."""
    if layout.padded:
        N, T = layout.n_seq, layout.seq_len
        return tok.view(N, T).sum(1, dtype=torch.float64), counted.view(N, T).sum(1)
    cu = layout.cu_seqlens
    zero = tok.new_zeros(1, dtype=torch.float64)
    # A float64 prefix sum (a deterministic scan) differenced at the boundaries: no atomics.
    csum = torch.cat([zero, tok.double().cumsum(0)])
    ccount = torch.cat([zero.long(), counted.long().cumsum(0)])
    return csum[cu[1:]] - csum[cu[:-1]], ccount[cu[1:]] - ccount[cu[:-1]]


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


def layout_of(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> Layout:
    """The token layout of logits or hidden states: padded (N, T, ...) or packed (total, ...) with cu_seqlens."""
    if cu_seqlens is None:
        N, T = x.shape[0], x.shape[1]
        return Layout(n_seq=N, rows=N * T, seq_len=T, padded=True, cu_seqlens=None)
    return Layout.packed(cu_seqlens.to(torch.int64), x.shape[0])


def token_stats(forward, labels: torch.Tensor, width: int, ignore_index: int, vocab) -> tuple:
    """(token log-probs, log-sum-exps) of ``forward(kernel labels)`` -- a backend's logp_forward or
    linear_forward over this rank's ``width`` vocabulary columns -- combined over the ``vocab`` group."""
    shard = vocab_shard(vocab, width)
    local, in_shard = local_labels(labels, shard, ignore_index)
    tok, lse = forward(local)
    if shard is None:
        return tok, lse
    return combine_vocab(tok, lse, labels, in_shard, shard, ignore_index, vocab)


def kernel_labels(labels: torch.Tensor, width: int, ignore_index: int, vocab) -> torch.Tensor:
    """The labels a backward kernel reads on this rank (its shard's columns; others match none)."""
    return local_labels(labels, vocab_shard(vocab, width), ignore_index)[0]


def _n_seq(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> int:
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


# ---- sequence_logps: logits -> per-sequence log-probs ----


@torch.library.custom_op("safedpo::sequence_logps", mutates_args=())
def sequence_logps_op(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: Optional[torch.Tensor], ignore_index: int,
                      average: bool, inplace: bool, backend: str, vocab_group: str = "",
                      context_group: str = "") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seq (N,) float32, lse (rows,) float32, count (N,) int64). labels: (rows,) int64 contiguous, full
    vocabulary ids. ``inplace`` only changes the backward (into the logits' own storage). The groups, by
    name (see parallel.py): logits sharded along the vocabulary, tokens sliced along the sequences."""
    layout = layout_of(logits, cu_seqlens)
    vocab, context = resolve(vocab_group), resolve(context_group)
    impl = backend_module(backend)
    with no_autocast():
        tok, lse = token_stats(lambda lab: impl.logp_forward(logits, lab, layout, ignore_index), labels, logits.shape[-1],
                               ignore_index, vocab)
        seq, count = sequence_values(tok, labels != ignore_index, layout, average, context)
    return seq, lse, count


@sequence_logps_op.register_fake
def _(logits, labels, cu_seqlens, ignore_index, average, inplace, backend, vocab_group="", context_group=""):
    n = _n_seq(logits, cu_seqlens)
    f32 = dict(dtype=torch.float32, device=logits.device)
    return logits.new_empty(n, **f32), logits.new_empty(labels.shape[0], **f32), labels.new_empty(n, dtype=torch.int64)


@torch.library.custom_op("safedpo::sequence_logps_grad", mutates_args=())
def sequence_logps_grad_op(grad_seq: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                           count: torch.Tensor, cu_seqlens: Optional[torch.Tensor], ignore_index: int, average: bool,
                           backend: str, vocab_group: str = "") -> torch.Tensor:
    """d loss / d logits (logits' shape and dtype, contiguous) for the sequences' d loss / d logp; with the
    global log-sum-exps, a vocabulary shard's gradient needs no communication."""
    layout = layout_of(logits, cu_seqlens)
    impl = backend_module(backend)
    with no_autocast():
        g_tok = token_grads(grad_seq, labels != ignore_index, count, layout, average)
        grad = impl.grad_buffer(logits.shape, logits.dtype, logits.device)
        local = kernel_labels(labels, logits.shape[-1], ignore_index, resolve(vocab_group))
        impl.logp_backward(logits, local, lse, g_tok, grad, layout, ignore_index)
    return grad


@sequence_logps_grad_op.register_fake
def _(grad_seq, logits, labels, lse, count, cu_seqlens, ignore_index, average, backend, vocab_group=""):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("safedpo::sequence_logps_grad_", mutates_args=("logits",))
def sequence_logps_grad_inplace_op(grad_seq: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                                   count: torch.Tensor, cu_seqlens: Optional[torch.Tensor], ignore_index: int,
                                   average: bool, backend: str, vocab_group: str = "") -> None:
    """``sequence_logps_grad`` written over the logits themselves (their version counter moves on)."""
    layout = layout_of(logits, cu_seqlens)
    with no_autocast():
        g_tok = token_grads(grad_seq, labels != ignore_index, count, layout, average)
        local = kernel_labels(labels, logits.shape[-1], ignore_index, resolve(vocab_group))
        backend_module(backend).logp_backward(logits, local, lse, g_tok, logits, layout, ignore_index)


@sequence_logps_grad_inplace_op.register_fake
def _(grad_seq, logits, labels, lse, count, cu_seqlens, ignore_index, average, backend, vocab_group=""):
    return None


def _nones(ctx, given: int) -> tuple:
    """None for the op's other inputs: as many as the call passed (the dispatcher drops trailing
    arguments equal to their defaults, such as the group names of a single-process call)."""
    return (None,) * (len(ctx.needs_input_grad) - given)


def _sequence_logps_setup(ctx, inputs, output):
    logits, labels, cu_seqlens, ignore_index, average, inplace, backend, *groups = inputs
    _, lse, count = output
    ctx.save_for_backward(logits, labels, lse, count, cu_seqlens)
    ctx.meta = (ignore_index, average, inplace, backend, groups[0] if groups else "")


@first_order_only
def _sequence_logps_backward(ctx, grad_seq, _grad_lse, _grad_count):
    logits, labels, lse, count, cu_seqlens = ctx.saved_tensors
    ignore_index, average, inplace, backend, vocab_group = ctx.meta
    args = (grad_seq, logits, labels, lse, count, cu_seqlens, ignore_index, average, backend, vocab_group)
    rest = _nones(ctx, 1)
    if not inplace:
        return sequence_logps_grad_op(*args), *rest
    sequence_logps_grad_inplace_op(*args)
    # The logits now hold their gradient (and a second backward through this graph fails autograd's
    # saved-tensor check). A new tensor over the same memory that needs no grad: AccumulateGrad takes it
    # as a leaf's .grad without a copy (it copies a returned tensor that requires grad).
    return logits.detach(), *rest


sequence_logps_op.register_autograd(_sequence_logps_backward, setup_context=_sequence_logps_setup)


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b, without a temporary when a and b are float32 already."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


class _Grads:
    """The fused-linear gradients being formed: d hidden rows (float32 or the matmul dtype), d weight and
    d bias accumulated in float32 in a fixed order (chunk after chunk: deterministic)."""

    def __init__(self, rows: int, V: int, H: int, hidden, need_h: bool, need_w: bool, need_b: bool, vocab=None):
        device = hidden.device
        # A vocabulary shard's d hidden is a part of a sum over the shards: float32 until it is complete.
        dtype = torch.float32 if vocab is not None else hidden.dtype
        self.hidden = torch.zeros(rows, H, dtype=dtype, device=device) if need_h else None
        self.weight = torch.zeros(V, H, dtype=torch.float32, device=device) if need_w else None
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

    def recompute(self, impl, h, w, b, lab, lse, g, rows, ignore_index, logit_scale, softcap) -> None:
        """The gradients of rows whose logits were not kept: recomputed a chunk of rows at a time."""
        chunk = impl.dlogits_chunk_rows(w.shape[0], h.dtype, h.device)
        for r0 in range(0, h.shape[0], chunk):
            r1 = min(r0 + chunk, h.shape[0])
            dz = impl.linear_dlogits(h[r0:r1], w, b, lab[r0:r1], lse[r0:r1], g[r0:r1], ignore_index, logit_scale, softcap)
            self.add(dz, h[r0:r1], w, rows[r0:r1])
            del dz

    def results(self, specs, scale=None) -> tuple:
        """(d hidden, d weight, d bias) in their inputs' (shape, dtype) ``specs``, times ``scale`` if given."""
        def out(g, spec):
            if g is None:
                return None
            if scale is not None:
                g = g.mul_(scale.to(g.dtype))
            return g.to(spec[1]).view(spec[0])
        return tuple(out(g, spec) for g, spec in zip((self.hidden, self.weight, self.bias), specs))


def _specs(*tensors) -> tuple:
    return tuple(None if t is None else (t.shape, t.dtype) for t in tensors)


# ---- linear_sequence_logps: hidden states and the LM head -> per-sequence log-probs ----


@torch.library.custom_op("safedpo::linear_sequence_logps", mutates_args=())
def linear_sequence_logps_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                             cu_seqlens: Optional[torch.Tensor], ignore_index: int, average: bool, logit_scale: float,
                             softcap: Optional[float], backend: str, vocab_group: str = "",
                             context_group: str = "") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seq (N,), lse (rows,) float32 (0 at ignored tokens), count (N,) int64).

    Only the counted (response) tokens are computed at all: their hidden rows are gathered first (an
    O(tokens x H) copy), so prompt and padding tokens cost nothing. The logits stay on chip (Triton) or
    in chunks of rows (the CPU backends). With a ``vocab_group`` the weight (and bias) are this rank's
    rows of the head, with a ``context_group`` the tokens this rank's slice (see parallel.py)."""
    layout = layout_of(hidden, cu_seqlens)
    impl = backend_module(backend)
    vocab, context = resolve(vocab_group), resolve(context_group)
    counted = labels != ignore_index
    idx = counted.nonzero().squeeze(1)
    with no_autocast():
        h = hidden.reshape(layout.rows, hidden.shape[-1]).index_select(0, idx)
        w, b = impl.prepare_weight(weight, bias, hidden.dtype)
        lab = labels.index_select(0, idx)
        tok_c, lse_c = token_stats(lambda local: impl.linear_forward(h, w, b, local, ignore_index, logit_scale, softcap),
                                   lab, weight.shape[0], ignore_index, vocab)
        tok = torch.zeros(layout.rows, dtype=torch.float32, device=hidden.device).index_copy_(0, idx, tok_c)
        lse = torch.zeros_like(tok).index_copy_(0, idx, lse_c)
        seq, count = sequence_values(tok, counted, layout, average, context)
    return seq, lse, count


@linear_sequence_logps_op.register_fake
def _(hidden, weight, bias, labels, cu_seqlens, ignore_index, average, logit_scale, softcap, backend, vocab_group="",
      context_group=""):
    n = _n_seq(hidden, cu_seqlens)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return hidden.new_empty(n, **f32), hidden.new_empty(labels.shape[0], **f32), labels.new_empty(n, dtype=torch.int64)


def _no_grad_slot(like: torch.Tensor) -> torch.Tensor:
    """What an op returns for a gradient nobody asked for: an empty tensor (ops cannot return None)."""
    return like.new_empty(0)


@torch.library.custom_op("safedpo::linear_sequence_logps_grad", mutates_args=())
def linear_sequence_logps_grad_op(grad_seq: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                  bias: Optional[torch.Tensor], labels: torch.Tensor, lse: torch.Tensor,
                                  count: torch.Tensor, cu_seqlens: Optional[torch.Tensor], ignore_index: int,
                                  average: bool, logit_scale: float, softcap: Optional[float], backend: str,
                                  need_hidden: bool, need_weight: bool, need_bias: bool,
                                  vocab_group: str = "") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias) in their inputs' shapes and dtypes (empty where not needed): the logits
    recomputed chunk by chunk (the upstream gradient is unknown in forward), d hidden = d logits @ weight
    and d weight += d logits.T @ hidden by matmuls, d weight accumulated in float32 in a fixed order. A
    vocabulary shard's d hidden is its part: all-reduced over the ``vocab_group``."""
    layout = layout_of(hidden, cu_seqlens)
    impl = backend_module(backend)
    vocab = resolve(vocab_group)
    counted = labels != ignore_index
    idx = counted.nonzero().squeeze(1)
    H = hidden.shape[-1]
    with no_autocast():
        g = token_grads(grad_seq, counted, count, layout, average).index_select(0, idx)
        h = hidden.reshape(layout.rows, H).index_select(0, idx)
        w, b = impl.prepare_weight(weight, bias, hidden.dtype)
        grads = _Grads(layout.rows, weight.shape[0], H, hidden, need_hidden, need_weight, need_bias and bias is not None,
                       vocab)
        local = kernel_labels(labels.index_select(0, idx), weight.shape[0], ignore_index, vocab)
        grads.recompute(impl, h, w, b, local, lse.index_select(0, idx), g, idx, ignore_index, logit_scale, softcap)
        grads.complete_hidden(vocab)
        out = grads.results(_specs(hidden, weight, bias))
    return tuple(_no_grad_slot(hidden) if o is None else o for o in out)


@linear_sequence_logps_grad_op.register_fake
def _(grad_seq, hidden, weight, bias, labels, lse, count, cu_seqlens, ignore_index, average, logit_scale, softcap,
      backend, need_hidden, need_weight, need_bias, vocab_group=""):
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias) -> tuple:
    return (hidden.new_empty(hidden.shape) if need_hidden else _no_grad_slot(hidden),
            weight.new_empty(weight.shape) if need_weight else _no_grad_slot(hidden),
            bias.new_empty(bias.shape) if need_bias and bias is not None else _no_grad_slot(hidden))


def _linear_sequence_logps_setup(ctx, inputs, output):
    hidden, weight, bias, labels, cu_seqlens, ignore_index, average, logit_scale, softcap, backend, *groups = inputs
    _, lse, count = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, count, cu_seqlens)
    ctx.meta = (ignore_index, average, logit_scale, softcap, backend, groups[0] if groups else "")


@first_order_only
def _linear_sequence_logps_backward(ctx, grad_seq, _grad_lse, _grad_count):
    hidden, weight, bias, labels, lse, count, cu_seqlens = ctx.saved_tensors
    ignore_index, average, logit_scale, softcap, backend, vocab = ctx.meta
    need = ctx.needs_input_grad[:3]
    grads = linear_sequence_logps_grad_op(grad_seq, hidden, weight, bias, labels, lse, count, cu_seqlens, ignore_index,
                                          average, logit_scale, softcap, backend, *need, vocab)
    return (*(g if n else None for g, n in zip(grads, need)), *_nones(ctx, 3))


linear_sequence_logps_op.register_autograd(_linear_sequence_logps_backward, setup_context=_linear_sequence_logps_setup)


def _sequence_ids(layout: Layout, device) -> torch.Tensor:
    """(rows,) int64: the sequence each token row belongs to."""
    if layout.padded:
        return torch.arange(layout.rows, device=device) // layout.seq_len
    lengths = layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]
    return torch.arange(layout.n_seq, device=device).repeat_interleave(lengths, output_size=layout.rows)


def _pair_runs(rows_per_pair: list, budget_rows: int) -> list:
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


def plan_pair_chunks(labels: torch.Tensor, layout: Layout, ignore_index: int, budget_rows: int, context=None) -> list:
    """Split the pairs into chunks of at most ``budget_rows`` counted tokens (a pair larger than that is
    a chunk alone). Reads the per-pair token counts on the host (one sync): the chunk sizes are Python
    ints that size the chunks' buffers. With a ``context`` group the pairs' token counts are added up
    over it first, so that every rank cuts the same chunks of pairs (each of its own tokens)."""
    device = labels.device
    B = layout.n_seq // 2
    idx = (labels != ignore_index).nonzero().squeeze(1)
    seq = _sequence_ids(layout, device).index_select(0, idx)
    pair = seq % B
    per_pair = torch.bincount(pair, minlength=B)
    if context is not None:
        per_pair = all_reduce(per_pair.clone(), context)
    runs = _pair_runs(per_pair.tolist(), budget_rows)
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
    return max(1, linear_chunk_bytes(device) // (4 * V))


class LinearHead(NamedTuple):
    """How the labels and the LM head's output are read: ignore_index, and the logit transform
    z = softcap * tanh(logit_scale * z0 / softcap) (or logit_scale * z0 without softcap)."""

    ignore_index: int
    logit_scale: float
    softcap: Optional[float]


@torch.library.custom_op("safedpo::linear_safedpo_loss", mutates_args=())
def linear_safedpo_loss_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                           ref_logps: Optional[torch.Tensor], chosen_safe: torch.Tensor, rejected_safe: torch.Tensor,
                           cu_seqlens: Optional[torch.Tensor], ignore_index: int, logit_scale: float,
                           softcap: Optional[float], beta: float, delta: float, swap: bool, drop_both_unsafe: bool,
                           label_smoothing: float, loss_type: str, reduction: str, average: bool, backend: str,
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

    The chunk plan reads the per-pair token counts, and a "mean" reduction the kept-pair count, on the
    host: two synchronizations per call on a GPU (inside the op: a compiled step has no graph break).

    Returns [loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, kept, swapped,
    d hidden, d weight, d bias] (empty gradients where not needed).
    """
    options = LossOptions(beta=beta, delta=delta, swap=swap, drop_both_unsafe=drop_both_unsafe,
                          label_smoothing=label_smoothing, loss_type=loss_type, reduction=reduction, average=average)
    head = LinearHead(ignore_index, logit_scale, softcap)
    layout = layout_of(hidden, cu_seqlens)
    impl = backend_module(backend)
    groups = Groups(resolve(vocab_group), resolve(context_group))
    device, V = hidden.device, weight.shape[0]
    B = layout.n_seq // 2
    wants = (need_hidden, need_weight, need_bias and bias is not None)
    with no_autocast():
        w, b = impl.prepare_weight(weight, bias, hidden.dtype)
        flat = hidden.reshape(layout.rows, hidden.shape[-1])
        grads = _Grads(layout.rows, V, hidden.shape[-1], hidden, *wants, groups.vocab) if any(wants) else None
        kept = safety_transform(chosen_safe, rejected_safe, options).kept
        norm = max(int(kept.sum()), 1) if options.reduction == "mean" else 1
        ref = torch.zeros(2 * B, dtype=torch.float32, device=device) if ref_logps is None else ref_logps.float()
        per_chunk = options.replace(reduction="sum")
        budget = loss_chunk_rows(V, device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        metrics = []
        for chunk in plan_pair_chunks(labels, layout, head.ignore_index, budget, groups.context):
            out = _chunk_loss(impl, chunk, flat, w, b, labels, ref, chosen_safe, rejected_safe, per_chunk, head, budget,
                              norm, grads, groups)
            total += out.loss.detach().double()
            metrics.append([m.detach() for m in out[1:]])
        loss = (total / norm).float()
        if grads is not None:
            grads.complete_hidden(groups.vocab)
        results = grads.results(_specs(hidden, weight, bias)) if grads is not None else (None, None, None)
    metrics = [torch.cat(m) for m in zip(*metrics)]
    return [loss, *metrics, *(_no_grad_slot(hidden) if g is None else g for g in results)]


@linear_safedpo_loss_op.register_fake
def _(hidden, weight, bias, labels, ref_logps, chosen_safe, rejected_safe, cu_seqlens, ignore_index, logit_scale,
      softcap, beta, delta, swap, drop_both_unsafe, label_smoothing, loss_type, reduction, average, backend,
      need_hidden, need_weight, need_bias, vocab_group="", context_group=""):
    B = _n_seq(hidden, cu_seqlens) // 2
    f32 = dict(dtype=torch.float32, device=hidden.device)
    flags = dict(dtype=torch.bool, device=hidden.device)
    return [hidden.new_empty((), **f32), *(hidden.new_empty(B, **f32) for _ in range(4)), hidden.new_empty(B, **flags),
            hidden.new_empty(B, **flags), *_fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)]


def _no_second_order(name: str):
    """The autograd formula of a backward op: its inputs are a backward's, and their derivatives (second
    derivatives of the loss) are not supported."""

    def backward(ctx, *grads):
        raise RuntimeError(f"safedpo_kernels computes first-order gradients only: {name} cannot be differentiated "
                           "(backward with create_graph=True, or torch.func transforms of a backward)")

    return backward


def _linear_loss_setup(ctx, inputs, output):
    # Only the loss is differentiable: the metrics carry no gradient (the contract), and the formed
    # gradients are the backward's inputs.
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[7:])
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
        grads.append(g * grad_loss.to(g.dtype) if n else None)
    return (*grads, *_nones(ctx, 3))


linear_safedpo_loss_op.register_autograd(_linear_loss_backward, setup_context=_linear_loss_setup)


def _chunk_loss(impl, chunk: PairChunk, flat, w, b, labels, ref, chosen_safe, rejected_safe, options: LossOptions,
                head: LinearHead, budget: int, norm: int, grads, groups: Groups):
    """One chunk of pairs: its logits, log-probs and loss (summed over its kept pairs), and, when
    ``grads`` is given, its gradients folded in (scaled by 1 / norm). Vocabulary shards combine their
    token statistics, context slices their sequences' sums; every rank gets the chunk's loss."""
    h = flat.index_select(0, chunk.rows)
    lab = labels.index_select(0, chunk.rows)
    rows = chunk.rows.numel()
    flat_layout = Layout.single(rows)
    two_pass = rows > budget
    z = None

    def forward(local):
        nonlocal z
        if two_pass:
            return impl.linear_forward(h, w, b, local, head.ignore_index, head.logit_scale, head.softcap)
        z = impl.linear_logits(h, w, b, head.logit_scale, head.softcap)
        return impl.logp_forward(z, local, flat_layout, head.ignore_index)

    tok, lse = token_stats(forward, lab, w.shape[0], head.ignore_index, groups.vocab)
    every = torch.ones(rows, dtype=torch.bool, device=h.device)  # the chunk holds counted tokens only
    logps, count = sequence_values(tok, every, chunk.layout, options.average, groups.context)
    pair = (ref.index_select(0, chunk.sequences), chosen_safe[chunk.p0:chunk.p1], rejected_safe[chunk.p0:chunk.p1])
    if grads is None:
        return loss_from_logps(logps, *pair, options)
    out, dlogp = loss_and_logp_grad(logps, *pair, options)  # inside an op autograd does not record
    if rows == 0:
        return out
    g = token_grads(dlogp.double() / norm, every, count, chunk.layout, options.average)
    local = kernel_labels(lab, w.shape[0], head.ignore_index, groups.vocab)
    if two_pass:
        grads.recompute(impl, h, w, b, local, lse, g, chunk.rows, head.ignore_index, head.logit_scale, head.softcap)
        return out
    # d loss / d z0 = scale * d loss / d z (times the softcap derivative, which the kernel applies).
    dz = z if w.dtype == z.dtype else torch.empty(z.shape, dtype=w.dtype, device=z.device)
    impl.logp_backward(z, local, lse, g * head.logit_scale, dz, flat_layout, head.ignore_index, head.softcap)
    grads.add(dz, h.to(w.dtype), w, chunk.rows)
    return out


sequence_logps_grad_op.register_autograd(_no_second_order("sequence_logps_grad"))
linear_sequence_logps_grad_op.register_autograd(_no_second_order("linear_sequence_logps_grad"))
