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

from ._checks import check_range
from .dispatch import BACKENDS
from .parallel import Groups
from .transform import LogitTransform

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
REDUCTIONS = ("mean", "sum")


def _flag(name: str, value) -> bool:
    """A true/false option: bool (numpy's too), or the integers 0 / 1; anything else (a string such as 'no',
    which Python would take as True) is an error."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class LossOptions:
    """SafeDPO's loss hyper-parameters (see ``safedpo_loss_from_logps`` for the formula).

    beta > 0: the implicit reward's scale. delta >= 0: the safety margin (not multiplied by beta).
    swap / drop_both_unsafe: the safety transform T (swap a pair whose preferred response is unsafe and
    the other safe; drop a pair whose responses are both unsafe). label_smoothing in [0, 0.5] (below
    0.5 for "robust"). loss_type: "sigmoid" (SafeDPO), "robust", "hinge" or "ipo". reduction: "mean" or
    "sum" over the kept pairs. average: sequence log-probs are means over the counted tokens instead of
    sums (the reference log-probs must be computed the same way).

    Constructing one checks every value (ValueError naming the first bad one); numbers are stored as
    floats, so ``LossOptions(beta=1)`` equals ``LossOptions(beta=1.0)``.
    """

    beta: float = 0.1
    delta: float = 10.0
    swap: bool = True
    drop_both_unsafe: bool = True
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    reduction: str = "mean"
    average: bool = False

    def __post_init__(self):
        inf = float("inf")
        check_range(beta=(self.beta, 0.0, False, inf), delta=(self.delta, 0.0, True, inf),
                    label_smoothing=(self.label_smoothing, 0.0, True, 0.5))
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.loss_type == "robust" and float(self.label_smoothing) >= 0.5:
            raise ValueError("label_smoothing must be below 0.5 for loss_type='robust' (it divides by 1 - 2 * eps), "
                             f"got {self.label_smoothing}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        for name in ("beta", "delta", "label_smoothing"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("swap", "drop_both_unsafe", "average"):
            object.__setattr__(self, name, _flag(name, getattr(self, name)))

    def replace(self, **changes) -> "LossOptions":
        """A copy with some values changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def op_args(self) -> tuple:
        """The options as the custom ops take them (``safedpo::linear_safedpo_loss``), in field order."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def as_dict(self) -> dict:
        """The options as keywords of the public functions."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CallOptions:
    """The non-loss keywords of a call: ignore_index, backend (a name of ``BACKENDS``, resolved for the
    tensors' device at each call), validate, inplace_backward (the logits path's; the fused-linear path has
    no logits to overwrite), the fused-linear path's logit ``transform`` and the parallel layout
    (``groups``: the vocabulary and context process groups, None each when not parallel). Checked at
    construction (the backend's name: ValueError)."""

    ignore_index: int = -100
    backend: str = "auto"
    validate: bool = True
    inplace_backward: bool = False
    transform: LogitTransform = LogitTransform()
    groups: Groups = Groups(None, None)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @staticmethod
    def of(ignore_index: int = -100, backend: str = "auto", validate: bool = True, inplace_backward: bool = False,
           logit_scale: float = 1.0, softcap=None, vocab_group=None, context_group=None) -> "CallOptions":
        """From the public functions' keywords."""
        return CallOptions(ignore_index, backend, validate, inplace_backward, LogitTransform(logit_scale, softcap),
                           Groups(vocab_group, context_group))

    def replace(self, **changes) -> "CallOptions":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """The options as keywords of the public functions (the groups only where set)."""
        out = dict(ignore_index=self.ignore_index, backend=self.backend, validate=self.validate,
                   inplace_backward=self.inplace_backward, **self.transform.kwargs())
        groups = dict(vocab_group=self.groups.vocab, context_group=self.groups.context)
        return {**out, **{k: v for k, v in groups.items() if v is not None}}


__all__ = ["LossOptions", "CallOptions", "LOSS_TYPES", "REDUCTIONS"]
