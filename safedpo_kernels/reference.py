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


def safedpo_loss_from_logps(policy_logps: torch.Tensor, ref_logps: Optional[torch.Tensor], chosen_safe: torch.Tensor,
                            rejected_safe: torch.Tensor, **options) -> SafeDPOOutput:
    """SafeDPO (paper Eq. 12) and the SafeDAA losses from sequence log-probs, one pair at a time.

    policy_logps, ref_logps: (2B,), chosen rows first (ref_logps None: zeros). chosen_safe, rejected_safe:
    (B,), True = safe. ``options``: the keywords of ``LossOptions`` (beta, delta, swap, ...; ``average``
    is the log-probs' business and unused here).
    """
    o = LossOptions(**options)
    B = chosen_safe.shape[0]
    if ref_logps is None:
        ref_logps = torch.zeros_like(policy_logps)
    eps = o.label_smoothing
    losses, rows = [], []
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
        if o.loss_type == "sigmoid":
            loss_i = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
        elif o.loss_type == "robust":
            loss_i = (-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps)
        elif o.loss_type == "hinge":
            loss_i = torch.clamp(1 - u, min=0)
        else:  # ipo
            loss_i = (u / o.beta - 1 / (2 * o.beta)) ** 2
        if kept:
            losses.append(loss_i)
        rows.append((policy_logps[w], policy_logps[l], chosen_reward, rejected_reward, kept, swapped))
    if not losses:
        loss = policy_logps.sum() * 0.0
    else:
        loss = torch.stack(losses).mean() if o.reduction == "mean" else torch.stack(losses).sum()
    cl, rl, cr, rr, kept, swapped = zip(*rows)
    flags = dict(dtype=torch.bool, device=policy_logps.device)
    return SafeDPOOutput.of(loss, torch.stack(cl).detach(), torch.stack(rl).detach(), torch.stack(cr).detach(),
                            torch.stack(rr).detach(), torch.tensor(kept, **flags), torch.tensor(swapped, **flags))


def safedpo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_logps: Optional[torch.Tensor], chosen_safe: torch.Tensor,
                 rejected_safe: torch.Tensor, ignore_index: int = -100, cu_seqlens: Optional[torch.Tensor] = None,
                 **options) -> SafeDPOOutput:
    """Eager SafeDPO from logits: ``sequence_logps`` (with ``options``' average) then ``safedpo_loss_from_logps``."""
    policy = sequence_logps(logits, labels, ignore_index, options.get("average", False), cu_seqlens)
    ref = None if ref_logps is None else ref_logps.to(policy.dtype)
    return safedpo_loss_from_logps(policy, ref, chosen_safe, rejected_safe, **options)


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  logit_scale: float = 1.0, softcap: Optional[float] = None) -> torch.Tensor:
    """The logits the fused-linear entry points never materialize: with z0 = hidden @ weight.T (+ bias),
    softcap * tanh(logit_scale * z0 / softcap) when softcap is set, else logit_scale * z0."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = logit_scale * z
    return z if softcap is None else softcap * torch.tanh(z / softcap)
