"""What stops a run early without losing its last good state: non-finite numbers and stop signals.

Non-finite numbers. After each step's backward, the loss of every micro-batch and the gradients are
checked on every rank, and the ranks agree through one all-reduce. A non-finite step applies no update.
``nonfinite: error`` (the default) stops the run with one line naming the step, the micro-batch, whether
the loss or the gradients were non-finite, and the last good checkpoint (``NonFiniteError``, exit status
3). ``nonfinite: skip`` skips the update (the step consumes its batch and advances the learning-rate
schedule; the weights and the optimizer state stay as they were) and stops after
``max_nonfinite_steps`` consecutive skips. A checkpoint or final model with non-finite weights is never
written, so ``save_total_limit``'s rotation never removes the newest finite checkpoint. The first
non-finite step of a run is described in ``nonfinite-step-<k>.json`` (its pairs, each micro-batch's loss,
and the per-pair log-probs, rewards and kept flags of the micro-batches whose loss was non-finite),
without weights.

Stop signals. The first SIGTERM or SIGINT asks the run to stop after the optimizer step in flight (an
evaluation or a save in flight finishes first); the ranks agree on the step through one all-reduce per
step, a checkpoint is written and the process exits with status 75 (EX_TEMPFAIL: try again later) and a
line saying how to resume. A second signal (more than ``DUPLICATE_S`` seconds after the first: a
terminal's Ctrl-C under torchrun reaches both torchrun and its workers, which then forwards it) stops at
once: the checkpoints already written stay intact, since each is renamed into place whole.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import Optional

import torch

# Exit statuses of `safedpo train` (the CLI's): stopped on non-finite numbers; stopped by a signal with a
# checkpoint written (EX_TEMPFAIL of sysexits.h: a temporary failure, the same command continues the run).
NONFINITE_STATUS = 3
INTERRUPTED_STATUS = 75
NONFINITE_MODES = ("error", "skip")
# Seconds within which a second signal counts as the same request delivered twice.
DUPLICATE_S = 2.0


class NonFiniteError(FloatingPointError):
    """The run stopped on a non-finite loss, gradient or weight; nothing non-finite was saved."""


class Interrupted(Exception):
    """The run stopped at a signal after writing a checkpoint (``signum``, ``step``, ``checkpoint``)."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: Optional[str]):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2, tensor parallel), or the tensor itself: checked without a collective."""
    return t.to_local() if hasattr(t, "to_local") else t


def all_finite(tensors) -> bool:
    """Whether every element of ``tensors`` (this rank's shards) is finite: one fused norm, one sync.
    A norm past float32's range also counts as non-finite."""
    tensors = [_local(t).detach() for t in tensors if t is not None]
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors, error_if_nonfinite=False)))


def grads_finite(params) -> bool:
    return all_finite(p.grad for p in params)


def weights_finite(model) -> bool:
    return all_finite(p for p in model.parameters())


def finite_or_none(value):
    """``value`` with every non-finite float replaced by None, so that it can be written as strict JSON
    (NaN and Infinity are not JSON; metrics.jsonl writes them as null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


class StopSignals:
    """SIGTERM and SIGINT while a run trains (see the module docstring): ``signum`` is the first one
    received, or None. Installed only in the main thread (Python delivers signals there); the previous
    handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self._first = 0.0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first = signum, now
            print(f"safedpo: {signal.Signals(signum).name}: stopping after this step with a checkpoint "
                  "(a second signal stops at once)", file=sys.stderr, flush=True)
            return
        if now - self._first < DUPLICATE_S:
            return
        self.__exit__()
        print(f"safedpo: second {signal.Signals(signum).name}: stopping now; the checkpoints already written are "
              "intact", file=sys.stderr, flush=True)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
