"""A call's keywords as two typed, validated objects: the loss's hyper-parameters (``LossOptions``) and
how the call reads its inputs and where it runs (``CallOptions``).

    from safedpo_kernels.options import LossOptions
    options = LossOptions(beta=0.1, delta=10.0, loss_type="hinge")

The public functions and modules take these as keywords (shared/SPEC.md's signatures) and build the
objects once; everything below them -- the ops, the pair loss, the trainers -- passes the objects on, so
that an option cannot be lost on the way. The trainer's config and TRL's ``SafeDPOConfig`` build theirs
with ``LossOptions(...)`` too: the ranges are checked here, once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from ._checks import check_range
from .dispatch import BACKENDS
from .parallel import Groups
from .transform import LogitTransform

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")  # the pair losses
TERMS = (*LOSS_TYPES, "sft")  # what loss_type may name: the pair losses and the preferred responses' NLL
REDUCTIONS = ("mean", "sum")


def _flag(name: str, value) -> bool:
    """A true/false option: bool (numpy's too), or the integers 0 / 1; anything else (a string such as 'no',
    which Python would take as True) is an error."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


def _loss_types(value):
    """loss_type as given -- one name, or a non-empty sequence of distinct names -- checked: the name (a
    str) or a tuple of names."""
    if isinstance(value, str):
        names = (value,)
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = tuple(value)
        if not names:
            raise ValueError(f"loss_type must name at least one of {TERMS}, got an empty list")
    else:
        raise ValueError(f"loss_type must be one of {TERMS} or a list of them, got {value!r}")
    unknown = [n for n in names if n not in TERMS]
    if unknown:
        raise ValueError(f"loss_type: unknown name(s) {unknown}; the supported ones are {TERMS}")
    if len(set(names)) != len(names):
        raise ValueError(f"loss_type names a term more than once: {list(names)}")
    return value if isinstance(value, str) else names


def _loss_weights(value, k: int):
    """loss_weights: None (all 1.0) or ``k`` finite numbers >= 0, as a tuple of floats."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"loss_weights must be a list of {k} numbers (one per loss_type), got {value!r}")
    if len(value) != k:
        raise ValueError(f"loss_weights has {len(value)} weight(s) for {k} loss_type name(s); give one per name")
    for i, w in enumerate(value):
        check_range(**{f"loss_weights[{i}]": (w, 0.0, True, float("inf"))})
    return tuple(float(w) for w in value)


@dataclass(frozen=True)
class LossOptions:
    """SafeDPO's loss hyper-parameters (see ``safedpo_loss_from_logps`` for the formula).

    beta > 0: the implicit reward's scale. delta >= 0: the safety margin (not multiplied by beta).
    swap / drop_both_unsafe: the safety transform T (swap a pair whose preferred response is unsafe and
    the other safe; drop a pair whose responses are both unsafe). label_smoothing in [0, 0.5] (below
    0.5 for "robust"). loss_type: "sigmoid" (SafeDPO), "robust", "hinge", "ipo" or "sft" (the preferred
    responses' negative log-likelihood), or a list of distinct names whose terms are added, weighted by
    loss_weights (None: 1.0 each). reduction: "mean" or "sum" over the kept pairs (the "sft" term: over
    their preferred responses' tokens). average: sequence log-probs are means over the counted tokens
    instead of sums (the reference log-probs must be computed the same way).

    Constructing one checks every value (ValueError naming the first bad one); numbers are stored as
    floats, so ``LossOptions(beta=1)`` equals ``LossOptions(beta=1.0)``, and a list of names as a tuple.
    """

    beta: float = 0.1
    delta: float = 10.0
    swap: bool = True
    drop_both_unsafe: bool = True
    label_smoothing: float = 0.0
    loss_type: Union[str, Tuple[str, ...]] = "sigmoid"
    reduction: str = "mean"
    average: bool = False
    loss_weights: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        inf = float("inf")
        check_range(beta=(self.beta, 0.0, False, inf), delta=(self.delta, 0.0, True, inf),
                    label_smoothing=(self.label_smoothing, 0.0, True, 0.5))
        object.__setattr__(self, "loss_type", _loss_types(self.loss_type))
        object.__setattr__(self, "loss_weights", _loss_weights(self.loss_weights, len(self.terms)))
        if "robust" in self.terms and float(self.label_smoothing) >= 0.5:
            raise ValueError("label_smoothing must be below 0.5 for loss_type='robust' (it divides by 1 - 2 * eps), "
                             f"got {self.label_smoothing}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        for name in ("beta", "delta", "label_smoothing"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("swap", "drop_both_unsafe", "average"):
            object.__setattr__(self, name, _flag(name, getattr(self, name)))

    @property
    def terms(self) -> Tuple[str, ...]:
        """The loss's terms, in loss_type order."""
        return (self.loss_type,) if isinstance(self.loss_type, str) else self.loss_type

    @property
    def weights(self) -> Tuple[float, ...]:
        """Each term's weight (1.0 where loss_weights is None)."""
        return self.loss_weights or (1.0,) * len(self.terms)

    @property
    def uses_sft(self) -> bool:
        return "sft" in self.terms

    def replace(self, **changes) -> "LossOptions":
        """A copy with some values changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def op_args(self) -> tuple:
        """The options as the custom ops take them (``safedpo::linear_safedpo_loss``: the names joined by
        commas, the weights as a list), in field order; ``from_op_args`` reads them back."""
        return (self.beta, self.delta, self.swap, self.drop_both_unsafe, self.label_smoothing, ",".join(self.terms),
                self.reduction, self.average, list(self.weights))

    @staticmethod
    def from_op_args(beta, delta, swap, drop_both_unsafe, label_smoothing, loss_type, reduction, average,
                     loss_weights) -> "LossOptions":
        names = loss_type.split(",")
        return LossOptions(beta, delta, swap, drop_both_unsafe, label_smoothing, names[0] if len(names) == 1 else
                           tuple(names), reduction, average, tuple(loss_weights))

    def as_dict(self) -> dict:
        """The options as keywords of the public functions (a list of names as a list)."""
        out = dataclasses.asdict(self)
        if not isinstance(self.loss_type, str):
            out["loss_type"] = list(self.loss_type)
        if self.loss_weights is not None:
            out["loss_weights"] = list(self.loss_weights)
        return out


@dataclass(frozen=True)
class CallOptions:
    """The non-loss keywords of a call: ignore_index, backend (a name of ``BACKENDS``, resolved for the
    tensors' device at each call), validate, inplace_backward (the logits path's; the fused-linear path has
    no logits to overwrite), the fused-linear path's logit ``transform`` and the parallel layout
    (``groups``: the vocabulary and context process groups, None each when not parallel) and whether the
    same pass computes token statistics (``token_stats``). Checked at construction (the backend's name:
    ValueError)."""

    ignore_index: int = -100
    backend: str = "auto"
    validate: bool = True
    inplace_backward: bool = False
    # Factories, not shared default instances: dynamo cannot trace a dataclass whose __init__ defaults
    # hold an object of a class of ours (torch 2.11: a LogitTransform; torch 2.7: a NamedTuple too), and
    # every public call builds a CallOptions, inside compiled steps too.
    transform: LogitTransform = dataclasses.field(default_factory=LogitTransform)
    groups: Groups = dataclasses.field(default_factory=lambda: Groups(None, None))
    token_stats: bool = False

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        object.__setattr__(self, "token_stats", _flag("token_stats", self.token_stats))

    @staticmethod
    def of(ignore_index: int = -100, backend: str = "auto", validate: bool = True, inplace_backward: bool = False,
           logit_scale: float = 1.0, softcap=None, vocab_group=None, context_group=None,
           token_stats: bool = False) -> "CallOptions":
        """From the public functions' keywords."""
        return CallOptions(ignore_index, backend, validate, inplace_backward, LogitTransform(logit_scale, softcap),
                           Groups(vocab_group, context_group), token_stats)

    def replace(self, **changes) -> "CallOptions":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """The options as keywords of the public functions (the groups only where set)."""
        out = dict(ignore_index=self.ignore_index, backend=self.backend, validate=self.validate,
                   inplace_backward=self.inplace_backward, **self.transform.kwargs(), token_stats=self.token_stats)
        groups = dict(vocab_group=self.groups.vocab, context_group=self.groups.context)
        return {**out, **{k: v for k, v in groups.items() if v is not None}}


__all__ = ["LossOptions", "CallOptions", "LOSS_TYPES", "TERMS", "REDUCTIONS"]
