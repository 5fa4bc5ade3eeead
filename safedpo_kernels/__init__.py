"""safedpo-kernels: fused, memory-lean SafeDPO losses for PyTorch.

    from safedpo_kernels import sequence_logps, safedpo_loss, linear_sequence_logps, linear_safedpo_loss
    from safedpo_kernels import SafeDPOLoss, LinearSafeDPOLoss, SafeDPOOutput

See README.md for the formula, the layouts and the backends.
"""

from .api import LinearSafeDPOLoss, SafeDPOLoss, linear_safedpo_loss, linear_sequence_logps, safedpo_loss, sequence_logps
from .dispatch import available_backends
from .loss import SafeDPOOutput

__all__ = [
    "sequence_logps",
    "safedpo_loss",
    "linear_sequence_logps",
    "linear_safedpo_loss",
    "SafeDPOLoss",
    "LinearSafeDPOLoss",
    "SafeDPOOutput",
    "available_backends",
]
__version__ = "0.1.0"
