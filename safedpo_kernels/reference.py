"""Plain PyTorch SafeDPO: the test oracle and the eager baseline of the benchmarks.

Written for reading, not for speed: it materializes the full log-softmax (one float32 or float64 copy of
the logits), gathers, masks and sums, then applies the safety-aware transformation T pair by pair and
the SafeDPO loss. Pass float64 tensors to get the float64 oracle. No argument checking: the
public API does that.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .loss import SafeDPOOutput
from .options import LossOptions


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, average: bool = False,
                   cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum (or mean) over counted tokens of log_softmax(logits)[label], per sequence.

    logits (N, T, V) or packed (total, V); computed in float32, or float64 for float64 logits.
    Returns (N,) in that compute dtype.
    """
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = logits.to(compute).log_softmax(dim=-1)
    counted = labels != ignore_index
    safe_labels = torch.where(counted, labels, torch.zeros_like(labels)).long()
    token_logp = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    token_logp = torch.where(counted, token_logp, torch.zeros_like(token_logp))
    if cu_seqlens is None:
        total = token_logp.sum(dim=-1)
        count = counted.sum(dim=-1)
    else:
        bounds = cu_seqlens.tolist()
        total = torch.stack([token_logp[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
        count = torch.stack([counted[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    if average:
        total = total / count.clamp(min=1).to(compute)
    return total


def token_stats(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                cu_seqlens: Optional[torch.Tensor] = None) -> tuple:
    """Per sequence, over its counted tokens: (summed entropy of softmax(logits), summed mean logit over
    the vocabulary, how many labels are the first index of their row's maximum, counted tokens), computed
    in float64 for float64 logits. The oracle of the kernels' token statistics."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(compute)
    logp = z.log_softmax(dim=-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    mean = z.mean(-1)
    top1 = (z.argmax(-1) == labels).to(compute)
    counted = labels != ignore_index
    per_token = [torch.where(counted, x, torch.zeros_like(x)) for x in (entropy, mean, top1, counted.to(compute))]
    if cu_seqlens is None:
        return tuple(x.sum(-1) for x in per_token)
    bounds = cu_seqlens.tolist()
    return tuple(torch.stack([x[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]) for x in per_token)


def token_counts(labels: torch.Tensor, ignore_index: int = -100, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N,) int64: the counted tokens of each sequence."""
    counted = (labels != ignore_index).long()
    if cu_seqlens is None:
        return counted.sum(dim=-1)
    bounds = cu_seqlens.tolist()
    return torch.stack([counted[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])


def safedpo_loss_from_logps(policy_logps: torch.Tensor, ref_logps: Optional[torch.Tensor], chosen_safe: torch.Tensor,
                            rejected_safe: torch.Tensor, token_counts: Optional[torch.Tensor] = None, denominators=None,
                            **options) -> SafeDPOOutput:
    """SafeDPO (paper Eq. 12), the SafeDAA losses and their mixtures from sequence log-probs, one pair at a
    time.

    policy_logps, ref_logps: (2B,), chosen rows first (ref_logps None: zeros). chosen_safe, rejected_safe:
    (B,), True = safe. token_counts: (2B,) counted tokens per row (the "sft" term's). ``options``: the
    keywords of ``LossOptions`` (beta, delta, swap, ..., loss_type, loss_weights, average: with it the
    log-probs are token means, and a response's log-likelihood is mean x count). denominators: (pairs,
    tokens) instead of this call's own kept pairs and preferred tokens (reduction "mean").
    """
    o = LossOptions(**options)
    B = chosen_safe.shape[0]
    if ref_logps is None:
        ref_logps = torch.zeros_like(policy_logps)
    eps = o.label_smoothing
    pair_losses = {name: [] for name in o.terms}
    nll, tokens, rows = [], 0, []
    for i in range(B):
        w, l = i, B + i
        h_w, h_l = 1 - int(chosen_safe[i]), 1 - int(rejected_safe[i])
        kept = not (o.drop_both_unsafe and h_w == 1 and h_l == 1)
        swapped = o.swap and h_w == 1 and h_l == 0
        if swapped:
            w, l, h_w, h_l = l, w, h_l, h_w
        chosen_reward = o.beta * (policy_logps[w] - ref_logps[w])
        rejected_reward = o.beta * (policy_logps[l] - ref_logps[l])
        u = chosen_reward - rejected_reward - (h_l - h_w) * o.delta
        rows.append((policy_logps[w], policy_logps[l], chosen_reward, rejected_reward, kept, swapped))
        if not kept:
            continue
        for name in o.terms:
            if name == "sigmoid":
                pair_losses[name].append(-(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u))
            elif name == "robust":
                pair_losses[name].append((-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps))
            elif name == "hinge":
                pair_losses[name].append(torch.clamp(1 - u, min=0))
            elif name == "ipo":
                pair_losses[name].append((u / o.beta - 1 / (2 * o.beta)) ** 2)
        if o.uses_sft:
            n = int(token_counts[w])
            nll.append(-policy_logps[w] * (n if o.average else 1))
            tokens += n
    n_pairs = sum(r[4] for r in rows)
    if denominators is not None:
        n_pairs, tokens = float(denominators[0]), float(denominators[1])
    zero = policy_logps.sum() * 0.0
    parts = []
    for name, weight in zip(o.terms, o.weights):
        values, divisor = (nll, tokens) if name == "sft" else (pair_losses[name], n_pairs)
        total = torch.stack(values).sum() if values else zero
        if o.reduction == "mean":
            total = total / divisor if divisor > 0 else zero
        parts.append(weight * total)
    loss = sum(parts[1:], parts[0])
    cl, rl, cr, rr, kept, swapped = zip(*rows)
    flags = dict(dtype=torch.bool, device=policy_logps.device)
    return SafeDPOOutput(loss, torch.stack(cl).detach(), torch.stack(rl).detach(), torch.stack(cr).detach(),
                         torch.stack(rr).detach(), torch.tensor(kept, **flags), torch.tensor(swapped, **flags),
                         torch.stack([p.detach().float() for p in parts]))


def safedpo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logps: Optional[torch.Tensor], chosen_safe: torch.Tensor,
                 rejected_safe: torch.Tensor, ignore_index: int = -100, cu_seqlens: Optional[torch.Tensor] = None,
                 denominators=None, **options) -> SafeDPOOutput:
    """Eager SafeDPO from logits: ``sequence_logps`` (with ``options``' average) then ``safedpo_loss_from_logps``."""
    policy = sequence_logps(logits, labels, ignore_index, options.get("average", False), cu_seqlens)
    ref = None if ref_logps is None else ref_logps.to(policy.dtype)
    counts = token_counts(labels, ignore_index, cu_seqlens)
    return safedpo_loss_from_logps(policy, ref, chosen_safe, rejected_safe, counts, denominators, **options)


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  logit_scale: float = 1.0, softcap: Optional[float] = None) -> torch.Tensor:
    """The logits the fused-linear entry points never materialize: with z0 = hidden @ weight.T (+ bias),
    softcap * tanh(logit_scale * z0 / softcap) when softcap is set, else logit_scale * z0."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = logit_scale * z
    return z if softcap is None else softcap * torch.tanh(z / softcap)
