"""The kernels' entry points as torch.library custom ops (namespace ``safedpo``), one module per op with
its backward, fake implementation and autograd formula (the O(tokens) reductions they share are in
reductions.py, the fused-linear loss's chunk plan in chunking.py).

Each op is opaque to torch.compile -- a compiled training step calls it as one node, with no graph break
-- and has a fake implementation (output shapes from input shapes) and a registered autograd formula:

    safedpo::sequence_logps          logits -> (N,) log-probs, per-token log-sum-exp, token counts
    safedpo::sequence_logps_grad     its backward into a new buffer
    safedpo::sequence_logps_grad_    its backward written into the logits (in-place backward)
    safedpo::linear_sequence_logps   hidden states and LM head -> the same, logits never materialized
    safedpo::linear_sequence_logps_grad   its backward (logits recomputed chunk by chunk)
    safedpo::linear_safedpo_loss     the SafeDPO loss from hidden states, gradients formed in the forward

Each forward asks a backend (see ``dispatch.Backend``) for per-token log-probs and log-sum-exps, reduces
them per sequence in a fixed order and keeps only O(tokens) values; each backward turns the sequences'
d loss / d logp into d loss / d logits through the same backend. The logits ops read sizes from shapes
only: no host synchronization. linear_safedpo_loss plans its chunks from the per-pair token counts, which
it reads on the host (inside the op, so a compiled step still has no graph break).
"""

from ._support import autocast_operands
from .linear_safedpo_loss import linear_safedpo_loss_op
from .linear_sequence_logps import linear_sequence_logps_grad_op, linear_sequence_logps_op
from .sequence_logps import sequence_logps_grad_inplace_op, sequence_logps_grad_op, sequence_logps_op

__all__ = ["autocast_operands", "sequence_logps_op", "sequence_logps_grad_op", "sequence_logps_grad_inplace_op",
           "linear_sequence_logps_op", "linear_sequence_logps_grad_op", "linear_safedpo_loss_op"]
