"""The SafeDPO loss layer on top of sequence log-probs, shared by the logits and fused-linear paths.

Everything here is O(B): the heavy lifting (log-softmax, gather, masked sum and their backward) is in
the sequence log-prob kernels. Autograd differentiates this layer and hands each sequence its scalar
d loss / d logp, which the kernels' backward turns into d loss / d logits.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import check_denominators, check_pair_inputs, check_token_counts
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
    token_stats: a ``TokenStats`` of the (2B,) rows in the data's row order when the call asked for
        token_stats=True, else None.

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
    token_stats: Optional["TokenStats"] = None


class TokenStats(NamedTuple):
    """Per-sequence statistics of the predicted distributions at the counted tokens, from the same pass as
    the log-probs (``token_stats=True``), (N,) each in the data's row order (before T; dropped pairs'
    rows included), no gradient:

    entropy: float32, the summed entropy of the predicted distribution (nats).
    mean_logit: float32, the summed mean over the vocabulary of the logits (after any logit transform).
    top1: int64, how many labels are the top-1 prediction (the lowest index of the maximum, as TRL counts).
    tokens: int64, the counted tokens.

    Divide by ``tokens`` (summed over whatever rows are pooled) for per-token means.
    """

    entropy: torch.Tensor
    mean_logit: torch.Tensor
    top1: torch.Tensor
    tokens: torch.Tensor

    @staticmethod
    def of(row_stats: torch.Tensor) -> "TokenStats":
        """From an op's (N, 4) float32 columns (entropy, mean logit, top-1 count, tokens)."""
        return TokenStats(row_stats[:, 0], row_stats[:, 1], row_stats[:, 2].round().long(), row_stats[:, 3].round().long())


class Pairs(NamedTuple):
    """What a batch's (2B,) sequence log-probs need besides the options to be a SafeDPO loss: the (2B,)
    reference log-probs (or None: reference-free) and the (B,) safety flags, in the data's row order, and
    the divisors of reduction "mean" when the caller sets them (``denominators``: (pairs, tokens))."""

    ref_logps: Optional[torch.Tensor]
    chosen_safe: torch.Tensor
    rejected_safe: torch.Tensor
    denominators: Optional[object] = None


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


def pair_loss(u: torch.Tensor, name: str, options: LossOptions) -> torch.Tensor:
    """The per-pair loss ``name`` of margin u = beta * d - delta * (h_l - h_w)."""
    eps = options.label_smoothing
    if name == "sigmoid":
        out = -(1.0 - eps) * F.logsigmoid(u)
        return out - eps * F.logsigmoid(-u) if eps else out
    if name == "robust":
        return (-(1.0 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1.0 - 2.0 * eps)
    if name == "hinge":
        return torch.relu(1.0 - u)
    return (u / options.beta - 1.0 / (2.0 * options.beta)) ** 2  # ipo


def pair_loss_grad(u: torch.Tensor, name: str, options: LossOptions) -> torch.Tensor:
    """d pair_loss / d u, beside the loss it differentiates (for the fused-linear loss, which forms its
    gradients inside an op, where autograd does not record)."""
    eps = options.label_smoothing
    if name == "sigmoid":
        return -(1.0 - eps) * torch.sigmoid(-u) + eps * torch.sigmoid(u)
    if name == "robust":
        return (-(1.0 - eps) * torch.sigmoid(-u) - eps * torch.sigmoid(u)) / (1.0 - 2.0 * eps)
    if name == "hinge":
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


def preferred_counts(token_counts: torch.Tensor, roles: PairRoles) -> torch.Tensor:
    """(B,) counted tokens of each pair's preferred response after T (0 for dropped pairs): the "sft"
    term's tokens. ``token_counts``: (2B,) in the data's row order."""
    B = roles.kept.shape[0]
    counts = torch.where(roles.swapped, token_counts[B:], token_counts[:B])
    return torch.where(roles.kept, counts, torch.zeros_like(counts))


def loss_denominators(token_counts: Optional[torch.Tensor], chosen_safe: torch.Tensor, rejected_safe: torch.Tensor,
                      options: LossOptions) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kept pairs, tokens of their preferred responses after T) of a batch, as 0-dim float64 tensors: the
    divisors of reduction "mean". A trainer adds them up over its whole global batch (micro-batches and
    ranks) and passes the sums as ``denominators``, so that every micro-batch's loss is its exact share
    of the global-batch loss. ``token_counts`` (2B,): counted tokens per row in the data's row order (None
    gives 0 tokens: no "sft" term)."""
    roles = safety_transform(chosen_safe, rejected_safe, options)
    return _own_denominators(roles, None if token_counts is None else token_counts.to(roles.kept.device))


def _own_denominators(roles: PairRoles, token_counts) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kept pairs, tokens of their preferred responses; 0 without ``token_counts``), 0-dim float64."""
    pairs = roles.kept.sum().to(torch.float64)
    if token_counts is None:
        return pairs, torch.zeros((), dtype=torch.float64, device=pairs.device)
    return pairs, preferred_counts(token_counts, roles).sum().to(torch.float64)


def _divisors(m: _Margins, token_counts, options: LossOptions, denominators) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pair terms' and the "sft" term's divisors: 1 for reduction "sum", else the caller's
    ``denominators`` or this call's own."""
    device = m.u.device
    if options.reduction == "sum":
        one = torch.ones((), dtype=torch.float64, device=device)
        return one, one
    if denominators is not None:
        pairs, tokens = (torch.as_tensor(d, dtype=torch.float64, device=device) for d in denominators)
        return pairs, tokens
    return _own_denominators(m.roles, token_counts if options.uses_sft else None)


def _per(values: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """values / divisor (in the values' dtype), and 0 for a zero divisor: a term over nothing is 0, with
    zero gradient, never NaN."""
    d = divisor.to(values.dtype)
    return torch.where(d > 0, values / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(values))


def _sft_scale(m: _Margins, token_counts, options: LossOptions) -> torch.Tensor:
    """(B,) what turns a kept pair's preferred log-prob into its response's summed log-likelihood: 1 for
    summed log-probs, the token count for token means (``average``); 0 for dropped pairs."""
    if options.average:
        scale = preferred_counts(token_counts, m.roles).to(m.chosen.dtype)
    else:
        scale = torch.ones_like(m.chosen)
    return torch.where(m.roles.kept, scale, torch.zeros_like(scale))


def _check_counts(token_counts, options: LossOptions) -> None:
    if options.uses_sft and token_counts is None:
        raise ValueError("loss_type 'sft' needs token_counts: (2B,) counted tokens per row, in the data's row order")


def _terms(m: _Margins, token_counts, options: LossOptions, divisors) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, loss_terms (K,) float32 detached): each term over its divisor (``_divisors``), weighted and
    added up. A pair term sums its kept pairs' losses, each divided by the pairs' divisor; "sft" sums the
    kept pairs' preferred responses' negative log-likelihoods over the tokens' divisor."""
    pairs_div, tokens_div = divisors
    parts = []
    for name, weight in zip(options.terms, options.weights):
        if name == "sft":
            nll = -m.chosen * _sft_scale(m, token_counts, options)
            term = _per(nll, tokens_div).sum()
        else:
            per_pair = torch.where(m.roles.kept, pair_loss(m.u, name, options), torch.zeros_like(m.u))
            term = _per(per_pair, pairs_div).sum()
        parts.append(term * weight)
    loss = parts[0]
    for part in parts[1:]:
        loss = loss + part
    return loss, torch.stack([p.detach().float() for p in parts])


def _output(m: _Margins, loss: torch.Tensor, loss_terms: torch.Tensor, token_stats=None) -> SafeDPOOutput:
    # Built whole, never through _replace: torch 2.7's dynamo refuses NamedTuple._replace, and 2.11's
    # cannot return from a compiled step a NamedTuple that _replace made.
    return SafeDPOOutput(loss, m.chosen.detach(), m.rejected.detach(), m.chosen_rewards.detach(),
                         m.rejected_rewards.detach(), m.roles.kept, m.roles.swapped, loss_terms, token_stats)


def loss_from_logps(policy_logps: torch.Tensor, ref_logps, chosen_safe: torch.Tensor, rejected_safe: torch.Tensor,
                    options: LossOptions, token_counts: Optional[torch.Tensor] = None,
                    denominators=None, token_stats: Optional[TokenStats] = None) -> SafeDPOOutput:
    """``safedpo_loss_from_logps`` without argument checks: the fused entry points check once, up front.
    ``policy_logps`` is (2B,) float32; ``options.average`` says whether they are sums or token means;
    ``token_counts`` (2B,) the counted tokens per row (the "sft" term needs them); ``token_stats`` goes
    into the output's field of that name."""
    _check_counts(token_counts, options)
    m = _margins(policy_logps, ref_logps, chosen_safe, rejected_safe, options)
    terms = _terms(m, token_counts, options, _divisors(m, token_counts, options, denominators))
    return _output(m, *terms, token_stats)


def loss_and_logp_grad(policy_logps: torch.Tensor, ref_logps, chosen_safe: torch.Tensor, rejected_safe: torch.Tensor,
                       options: LossOptions, token_counts: Optional[torch.Tensor] = None, denominators=None) -> tuple:
    """(``loss_from_logps``'s output, d loss / d policy_logps (2B,)) without autograd: u moves by beta with
    the (transformed) chosen log-prob and by -beta with the rejected one; the "sft" term moves with the
    chosen log-prob alone."""
    _check_counts(token_counts, options)
    m = _margins(policy_logps, ref_logps, chosen_safe, rejected_safe, options)
    pairs_div, tokens_div = divisors = _divisors(m, token_counts, options, denominators)
    loss, loss_terms = _terms(m, token_counts, options, divisors)
    kept = m.roles.kept
    du = torch.zeros_like(m.u)
    d_chosen = torch.zeros_like(m.u)  # the "sft" term's own, on the preferred response after T
    for name, weight in zip(options.terms, options.weights):
        if name == "sft":
            d_chosen = d_chosen - weight * _per(_sft_scale(m, token_counts, options), tokens_div)
        else:
            grad = torch.where(kept, pair_loss_grad(m.u, name, options), torch.zeros_like(m.u))
            du = du + weight * _per(grad, pairs_div)
    du = du * options.beta
    d_w, d_l = du + d_chosen, -du  # d loss / d (chosen, rejected) after T
    swapped = m.roles.swapped  # the data's chosen row is the rejected one
    return _output(m, loss, loss_terms), torch.cat([torch.where(swapped, d_l, d_w), torch.where(swapped, d_w, d_l)])


def safedpo_loss_from_logps(
    policy_logps: torch.Tensor, ref_logps, chosen_safe: torch.Tensor, rejected_safe: torch.Tensor, *, beta: float = 0.1,
    delta: float = 10.0, swap: bool = True, drop_both_unsafe: bool = True, label_smoothing: float = 0.0,
    loss_type="sigmoid", reduction: str = "mean", loss_weights=None, token_counts: Optional[torch.Tensor] = None,
    average: bool = False, denominators=None,
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
        "sft"                the negative log-likelihood of the kept pairs' preferred responses after T

    With delta = 0, swap and drop off, each is the DPO loss of the same name. ``loss_type`` may list
    several distinct names: the loss is sum_k loss_weights[k] * term_k (TRL's loss mixing; e.g.
    ["sigmoid", "sft"] with weights [1.0, w] is RPO-style regularisation).

    Args:
        policy_logps: (2B,) float, chosen rows first; differentiable. Sums over the counted tokens, or
            their means with ``average=True``.
        ref_logps: (2B,) float in the same order, or None for reference-free training (zeros). No gradient.
        chosen_safe, rejected_safe: (B,) bool or 0/1 integers, True / 1 = safe.
        beta > 0; delta >= 0 (not multiplied by beta); label_smoothing in [0, 0.5].
        loss_type: one name or a list of distinct names; loss_weights: None (1.0 each) or one finite
            weight >= 0 per name.
        reduction: "mean": a pair term is its kept pairs' sum divided by their number, "sft" its summed
            NLL divided by the counted tokens of those responses (one token-level mean); "sum": the plain
            sums (weighted). A zero divisor gives a zero term.
        token_counts: (2B,) integers, the counted tokens of each row (data order, before T); needed by "sft".
        average: whether policy_logps are token means (then a response's NLL is mean x count).
        denominators: (pairs, tokens), numbers or 0-dim tensors: the divisors of reduction "mean" instead
            of this call's own (e.g. a trainer's counts over its whole global batch; see
            ``loss_denominators``).

    Returns:
        SafeDPOOutput(loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, kept, swapped,
        loss_terms, token_stats): float32 scalar loss, (B,) metrics in the roles after T (no gradient; reward =
        beta * (logp - ref_logp)), (K,) each term's weighted contribution, and token_stats None.
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
                          label_smoothing=label_smoothing, loss_type=loss_type, reduction=reduction, average=average,
                          loss_weights=loss_weights)
    if token_counts is not None:
        check_token_counts(token_counts, policy_logps.shape[0], policy_logps.device)
    denominators = check_denominators(denominators, options, policy_logps.device)
    return loss_from_logps(policy_logps.float(), ref_logps, chosen_safe, rejected_safe, options, token_counts,
                           denominators)
