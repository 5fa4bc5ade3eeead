"""safedpo-kernels: fused, memory-lean SafeDPO losses for PyTorch.

    from safedpo_kernels import sequence_logps, safedpo_loss, SafeDPOLoss, SafeDPOOutput

See README.md for the formula, the layouts and the backends.
"""

from .api import SafeDPOLoss, safedpo_loss, sequence_logps
from .reference import SafeDPOOutput

__all__ = ["sequence_logps", "safedpo_loss", "SafeDPOLoss", "SafeDPOOutput"]
__version__ = "0.1.0"
