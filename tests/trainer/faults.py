"""Faults injected into a training run, after a given optimizer step: what a divergence (a weight becomes
NaN) or a preemption (SIGTERM to the process, or to torchrun above it) does to the trainer. Installed in
the test process itself, or in a run's processes by tiny_runs.safedpo_train's sitecustomize hook."""

import os
import signal

import torch

MODES = ("nan-weight", "sigterm", "sigterm-parent")


def install(mode: str, step: int, rank=None) -> None:
    """After the ``step``-th AdamW step of this process (on rank ``rank`` only, when given):
    "nan-weight" sets one element of the last parameter (the final norm or the LM head, which every token
    passes) to NaN; "sigterm" sends SIGTERM to this process; "sigterm-parent" to its parent (torchrun's
    agent, which forwards it to every worker)."""
    assert mode in MODES, mode
    original = torch.optim.AdamW.step
    calls = [0]

    def step_then_fault(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == step and (rank is None or os.environ.get("RANK", "0") == str(rank)):
            if mode == "nan-weight":
                with torch.no_grad():
                    self.param_groups[-1]["params"][-1].view(-1)[0] = float("nan")
            elif mode == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                os.kill(os.getppid(), signal.SIGTERM)
        return out

    torch.optim.AdamW.step = step_then_fault
