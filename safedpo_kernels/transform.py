"""The fused-linear path's logit transform as one object, from the public keywords or a model's config
down to the backends, which take its two numbers.

With z0 = hidden @ weight.T + bias: z = softcap * tanh(logit_scale * z0 / softcap) when softcap is set,
else z = logit_scale * z0 (Gemma 2/3's final_logit_softcapping; Cohere's logit_scale; Granite's
logits_scaling = 1 / logit_scale; a sampling temperature T = 1 / logit_scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ._checks import check_logit_transform


@dataclass(frozen=True)
class LogitTransform:
    """logit_scale > 0 and softcap > 0 (or None), finite: checked at construction (ValueError naming the
    bad one), stored as floats."""

    logit_scale: float = 1.0
    softcap: Optional[float] = None

    def __post_init__(self):
        check_logit_transform(self.logit_scale, self.softcap)
        object.__setattr__(self, "logit_scale", float(self.logit_scale))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", float(self.softcap))

    def kwargs(self) -> dict:
        """The public functions' keywords: ``logit_scale=..., softcap=...``."""
        return dict(logit_scale=self.logit_scale, softcap=self.softcap)


__all__ = ["LogitTransform"]
