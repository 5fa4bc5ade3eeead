"""The SafeDPO loss layer on top of sequence log-probs, shared by the logits and fused-linear paths.

Everything here is O(B): the heavy lifting (log-softmax, gather, masked sum and their backward) is in
the sequence log-prob kernels. Autograd differentiates this layer and hands each sequence its scalar
d loss / d logp, which the kernels' backward turns into d loss / d logits.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._checks import check_pair_inputs
from .options import LossOptions


class SafeDPOOutput(NamedTuple):
    """Result of a SafeDPO loss. Per-pair fields are (B,) and describe the pairs AFTER transformation T.

    loss: scalar float32, mean of the per-pair loss over the kept pairs (0 when none is kept).
    chosen_logps / rejected_logps: the policy's sequence log-probs of the (transformed) preferred and
        dispreferred responses.
    chosen_rewards / rejected_rewards: beta * (logp - ref_logp) of the same.
    kept: bool, False for pairs dropped by T (both responses unsafe, when drop_both_unsafe).
    swapped: bool, True for pairs T swapped (preferred response unsafe, the other safe; never with swap=False).
    loss_terms: (K,) float32, no gradient: each loss term's weighted contribution, in loss_type order (they
        add up to ``loss``); one term, the loss itself, for a single loss_type.
    token_stats: None (SPEC's token statistics, when asked for; not computed by this version).

    Unpack it by name: positional unpacking of all its fields is not part of the contract.
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    kept: torch.Tensor
    swapped: torch.Tensor
    loss_terms: Optional[torch.Tensor] = None
    token_stats: Optional[tuple] = None

    @staticmethod
    def of(loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, kept, swapped) -> "SafeDPOOutput":
        """The output of one loss term: its ``loss_terms`` is the loss itself, detached, as (1,) float32."""
        return SafeDPOOutput(loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, kept, swapped,
                             loss.detach().float().reshape(1))


class Pairs(NamedTuple):
    """What a batch's (2B,) sequence log-probs need besides the options to be a SafeDPO loss: the (2B,)
    reference log-probs (or None: reference-free) and the (B,) safety flags, in the data's row order."""

    ref_logps: Optional[torch.Tensor]
    chosen_safe: torch.Tensor
    rejected_safe: torch.Tensor


class PairRoles(NamedTuple):
    """The safety transform T of a batch of pairs, (B,) each: which pairs are swapped and which kept, and
    the safety margin's sign after T, s = h_l - h_w (+1 for a (safe, unsafe) pair, -1 only for an
    unswapped (unsafe, safe) pair, else 0), as float32."""

    swapped: torch.Tensor
    kept: torch.Tensor
    margin_sign: torch.Tensor


def safety_transform(chosen_safe: torch.Tensor, rejected_safe: torch.Tensor, options: LossOptions) -> PairRoles:
    """T, the one place it is computed: h = 1 - safe; swap (when ``options.swap``) a pair with h_w = 1,
    h_l = 0; drop (when ``options.drop_both_unsafe``) a pair with h_w = h_l = 1."""
    h_w = ~chosen_safe.bool()
    h_l = ~rejected_safe.bool()
    swapped = (h_w & ~h_l) if options.swap else torch.zeros_like(h_w)
    kept = ~(h_w & h_l) if options.drop_both_unsafe else torch.ones_like(h_w)
    # A swapped pair has (safe, unsafe) roles after T: its sign is h_w - h_l of the data's order.
    sign = torch.where(swapped, h_w.float() - h_l.float(), h_l.float() - h_w.float())
    return PairRoles(swapped, kept, sign)


def pair_loss(u: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """The per-pair loss of margin u = beta * d - delta * (h_l - h_w) for each loss type."""
    eps = options.label_smoothing
    if options.loss_type == "sigmoid":
        out = -(1.0 - eps) * F.logsigmoid(u)
        return out - eps * F.logsigmoid(-u) if eps else out
    if options.loss_type == "robust":
        return (-(1.0 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1.0 - 2.0 * eps)
    if options.loss_type == "hinge":
        return torch.relu(1.0 - u)
    return (u / options.beta - 1.0 / (2.0 * options.beta)) ** 2  # ipo


def pair_loss_grad(u: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """d pair_loss / d u, beside the loss it differentiates (for the fused-linear loss, which forms its
    gradients inside an op, where autograd does not record)."""
    eps = options.label_smoothing
    if options.loss_type == "sigmoid":
        return -(1.0 - eps) * torch.sigmoid(-u) + eps * torch.sigmoid(u)
    if options.loss_type == "robust":
        return (-(1.0 - eps) * torch.sigmoid(-u) - eps * torch.sigmoid(u)) / (1.0 - 2.0 * eps)
    if options.loss_type == "hinge":
        return -(u < 1.0).to(u.dtype)  # relu'(0) = 0, as autograd has it
    return 2.0 * (u / options.beta - 1.0 / (2.0 * options.beta)) / options.beta  # ipo


class _Margins(NamedTuple):
    roles: PairRoles
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    u: torch.Tensor


def _margins(policy_logps, ref_logps, chosen_safe, rejected_safe, options: LossOptions) -> _Margins:
    """The pairs after T, their rewards and the margin u (0 for dropped pairs)."""
    B = chosen_safe.shape[0]
    ref = torch.zeros_like(policy_logps, dtype=torch.float32) if ref_logps is None else ref_logps.detach().to(torch.float32)
    roles = safety_transform(chosen_safe, rejected_safe, options)
    swapped = roles.swapped
    pol_w, pol_l = policy_logps[:B], policy_logps[B:]
    ref_w, ref_l = ref[:B], ref[B:]
    chosen = torch.where(swapped, pol_l, pol_w)
    rejected = torch.where(swapped, pol_w, pol_l)
    chosen_rewards = options.beta * (chosen - torch.where(swapped, ref_l, ref_w))
    rejected_rewards = options.beta * (rejected - torch.where(swapped, ref_w, ref_l))
    u = chosen_rewards - rejected_rewards - roles.margin_sign * options.delta
    # A dropped pair must not reach the non-linearity: a NaN there would leak into the kept pairs'
    # gradients through 0 * NaN; masking u first gives its rows an exact zero gradient.
    u = torch.where(roles.kept, u, torch.zeros_like(u))
    return _Margins(roles, chosen, rejected, chosen_rewards, rejected_rewards, u)


def _output(m: _Margins, loss: torch.Tensor) -> SafeDPOOutput:
    return SafeDPOOutput.of(loss, m.chosen.detach(), m.rejected.detach(), m.chosen_rewards.detach(),
                            m.rejected_rewards.detach(), m.roles.kept, m.roles.swapped)


def _reduce(per_pair: torch.Tensor, kept: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """Sum over the kept pairs, divided by their number for reduction "mean"."""
    out = torch.where(kept, per_pair, torch.zeros_like(per_pair))
    if options.reduction == "mean":
        return out / kept.sum().clamp(min=1).to(out.dtype)
    return out


def loss_from_logps(policy_logps: torch.Tensor, ref_logps, chosen_safe: torch.Tensor, rejected_safe: torch.Tensor,
                    options: LossOptions) -> SafeDPOOutput:
    """``safedpo_loss_from_logps`` without argument checks: the fused entry points check once, up front.
    ``policy_logps`` is (2B,) float32; ``options.average`` is the caller's business (the log-probs are
    already sums or means)."""
    m = _margins(policy_logps, ref_logps, chosen_safe, rejected_safe, options)
    return _output(m, _reduce(pair_loss(m.u, options), m.roles.kept, options).sum())


def loss_and_logp_grad(policy_logps: torch.Tensor, ref_logps, chosen_safe: torch.Tensor, rejected_safe: torch.Tensor,
                       options: LossOptions) -> tuple:
    """(``loss_from_logps``'s output, d loss / d policy_logps (2B,)) without autograd: u moves by beta with
    the (transformed) chosen log-prob and by -beta with the rejected one."""
    m = _margins(policy_logps, ref_logps, chosen_safe, rejected_safe, options)
    kept = m.roles.kept
    loss = _reduce(pair_loss(m.u, options), kept, options).sum()
    du = _reduce(pair_loss_grad(m.u, options), kept, options) * options.beta
    sign = torch.where(m.roles.swapped, -1.0, 1.0).to(du.dtype)  # the data's chosen row is the rejected one
    return _output(m, loss), torch.cat([du * sign, -du * sign])


def safedpo_loss_from_logps(
    policy_logps: torch.Tensor, ref_logps, chosen_safe: torch.Tensor, rejected_safe: torch.Tensor, *, beta: float = 0.1,
    delta: float = 10.0, swap: bool = True, drop_both_unsafe: bool = True, label_smoothing: float = 0.0,
    loss_type: str = "sigmoid", reduction: str = "mean",
) -> SafeDPOOutput:
    """SafeDPO (and the SafeDAA family) from sequence log-probs a caller already has.

    Every fused loss of this package computes its loss through this function. Pairs are transformed by
    T first: a pair whose preferred response is unsafe and the other safe is swapped (``swap``), a pair
    with both unsafe is dropped (``drop_both_unsafe``). Then, with d = (logp_w - ref_w) - (logp_l - ref_l),
    s = h_l - h_w (1 for a (safe, unsafe) pair, else 0) and u = beta * d - delta * s, eps = label_smoothing:

        "sigmoid" (SafeDPO)  -(1 - eps) log sigmoid(u) - eps log sigmoid(-u)
        "robust"             (-(1 - eps) log sigmoid(u) + eps log sigmoid(-u)) / (1 - 2 eps), eps < 0.5
        "hinge"              max(0, 1 - u)                      (eps unused)
        "ipo"                (u / beta - 1 / (2 beta))^2         (eps unused; use average=True log-probs)

    With delta = 0, swap and drop off, each is the DPO loss of the same name.

    Args:
        policy_logps: (2B,) float, chosen rows first; differentiable.
        ref_logps: (2B,) float in the same order, or None for reference-free training (zeros). No gradient.
        chosen_safe, rejected_safe: (B,) bool or 0/1 integers, True / 1 = safe.
        beta > 0; delta >= 0 (not multiplied by beta); label_smoothing in [0, 0.5].
        reduction: "mean" (over kept pairs; 0 when none is kept) or "sum" (over kept pairs, for a trainer
            that divides by the kept-pair count of its whole global batch).

    Returns:
        SafeDPOOutput(loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, kept, swapped,
        loss_terms, token_stats): float32 scalar loss, (B,) metrics in the roles after T (no gradient; reward =
        beta * (logp - ref_logp)), the (1,) loss term, and token_stats None.
    """
    if not isinstance(policy_logps, torch.Tensor):
        raise TypeError(f"policy_logps must be a torch.Tensor, got {type(policy_logps).__name__}")
    if not policy_logps.is_floating_point():
        raise TypeError(f"policy_logps must be a floating-point tensor, got {policy_logps.dtype}")
    if policy_logps.dim() != 1:
        raise ValueError(f"policy_logps must be 1-D (2B,), got shape {tuple(policy_logps.shape)}")
    check_pair_inputs(policy_logps.shape[0], policy_logps.device, ref_logps, chosen_safe, rejected_safe,
                      rows_name="policy_logps")
    options = LossOptions(beta=beta, delta=delta, swap=swap, drop_both_unsafe=drop_both_unsafe,
                          label_smoothing=label_smoothing, loss_type=loss_type, reduction=reduction)
    return loss_from_logps(policy_logps.float(), ref_logps, chosen_safe, rejected_safe, options)
