"""The SafeDPO loss layer on top of sequence log-probs, shared by the logits and fused-linear paths.

Everything here is O(B): the heavy lifting (log-softmax, gather, masked sum and their backward) is in
the sequence log-prob kernels. Autograd differentiates this layer and hands each sequence its scalar
d loss / d logp, which the kernels' backward turns into d loss / d logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_range


class SafeDPOOutput(NamedTuple):
    """Result of a SafeDPO loss. Per-pair fields are (B,) and describe the pairs AFTER transformation T.

    loss: scalar float32, mean of the per-pair loss over the kept pairs (0 when none is kept).
    chosen_logps / rejected_logps: the policy's sequence log-probs of the (transformed) preferred and
        dispreferred responses.
    chosen_rewards / rejected_rewards: beta * (logp - ref_logp) of the same.
    kept: bool, False for pairs dropped by T (both responses unsafe, when drop_both_unsafe).
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    kept: torch.Tensor


def check_loss_hparams(beta: float, delta: float, label_smoothing: float) -> None:
    inf = float("inf")
    check_range(beta=(beta, 0.0, False, inf), delta=(delta, 0.0, True, inf), label_smoothing=(label_smoothing, 0.0, True, 0.5))


def loss_from_logps(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    chosen_safe: torch.Tensor,
    rejected_safe: torch.Tensor,
    beta: float,
    delta: float,
    swap: bool,
    drop_both_unsafe: bool,
    label_smoothing: float,
) -> SafeDPOOutput:
    """SafeDPO loss and metrics from policy_logps (2B,) float32 (differentiable) and ref_logps (2B,).

    Applies T (swap a preferred-unsafe / other-safe pair, drop a both-unsafe pair), then
    u = beta * (chosen margin - rejected margin) - (h_l - h_w) * delta and
    loss = mean over kept pairs of -(1 - eps) log sigmoid(u) - eps log sigmoid(-u).
    """
    B = chosen_safe.shape[0]
    ref = ref_logps.detach().to(torch.float32)
    h_w = ~chosen_safe.bool()
    h_l = ~rejected_safe.bool()
    swapped = (h_w & ~h_l) if swap else torch.zeros_like(h_w)
    kept = ~(h_w & h_l) if drop_both_unsafe else torch.ones_like(h_w)

    pol_w, pol_l = policy_logps[:B], policy_logps[B:]
    ref_w, ref_l = ref[:B], ref[B:]
    chosen = torch.where(swapped, pol_l, pol_w)
    rejected = torch.where(swapped, pol_w, pol_l)
    chosen_ref = torch.where(swapped, ref_l, ref_w)
    rejected_ref = torch.where(swapped, ref_w, ref_l)
    # After T, h_l - h_w is +1 for (safe, unsafe), -1 only for an unswapped (unsafe, safe) pair, else 0.
    new_h_w = torch.where(swapped, h_l, h_w).float()
    new_h_l = torch.where(swapped, h_w, h_l).float()

    chosen_rewards = beta * (chosen - chosen_ref)
    rejected_rewards = beta * (rejected - rejected_ref)
    u = chosen_rewards - rejected_rewards - (new_h_l - new_h_w) * delta
    # A dropped pair must not reach the non-linearity: a NaN there would leak into the kept pairs'
    # gradients through 0 * NaN; masking u first gives its rows an exact zero gradient.
    u = torch.where(kept, u, torch.zeros_like(u))
    pair_loss = -(1.0 - label_smoothing) * F.logsigmoid(u)
    if label_smoothing:
        pair_loss = pair_loss - label_smoothing * F.logsigmoid(-u)
    pair_loss = torch.where(kept, pair_loss, torch.zeros_like(pair_loss))
    loss = pair_loss.sum() / kept.sum().clamp(min=1).to(pair_loss.dtype)
    return SafeDPOOutput(
        loss,
        chosen.detach(),
        rejected.detach(),
        chosen_rewards.detach(),
        rejected_rewards.detach(),
        kept,
    )
