"""The SafeDPO loss hyper-parameters as one typed, validated object.

    from safedpo_kernels.options import LossOptions
    options = LossOptions(beta=0.1, delta=10.0, loss_type="hinge")

The public functions and modules take these as keywords (shared/SPEC.md's signatures) and build a
``LossOptions`` once; everything below them -- the autograd Functions, the pair loss, the trainers --
passes the object on, so that an option cannot be lost on the way. The trainer's config and TRL's
``SafeDPOConfig`` build theirs with ``LossOptions(...)`` too: the ranges are checked here, once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ._checks import check_range

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


__all__ = ["LossOptions", "LOSS_TYPES", "REDUCTIONS"]
