"""safedpo-kernels: fused, memory-lean SafeDPO losses for PyTorch.

    from safedpo_kernels import sequence_logps, safedpo_loss, linear_sequence_logps, linear_safedpo_loss
    from safedpo_kernels import SafeDPOLoss, LinearSafeDPOLoss, SafeDPOOutput
    from safedpo_kernels import safedpo_loss_from_logps, labels_from_completion_mask, LossOptions
    from safedpo_kernels import loss_denominators   # a trainer's global-batch divisors (loss mixing)

See docs/loss.md, docs/api.md and docs/backends.md for the formula, the layouts and the backends.
"""

from .api import LinearSafeDPOLoss, SafeDPOLoss, linear_safedpo_loss, linear_sequence_logps, safedpo_loss, sequence_logps
from .dispatch import BACKENDS, available_backends
from .labels import labels_from_completion_mask
from .loss import SafeDPOOutput, TokenStats, loss_denominators, safedpo_loss_from_logps
from .options import LossOptions
from .transform import LogitTransform

__all__ = [
    "sequence_logps",
    "safedpo_loss",
    "linear_sequence_logps",
    "linear_safedpo_loss",
    "SafeDPOLoss",
    "LinearSafeDPOLoss",
    "SafeDPOOutput",
    "safedpo_loss_from_logps",
    "loss_denominators",
    "TokenStats",
    "labels_from_completion_mask",
    "LossOptions",
    "LogitTransform",
    "available_backends",
    "BACKENDS",
]
__version__ = "0.1.0"
