"""Checkpoints: model, optimizer, scheduler, RNG states and data position, written atomically."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    ckpts = sorted((output_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def resume_point(resume: str, output_dir: Path) -> Optional[Path]:
    """The checkpoint a run continues from: the latest (``auto``), none, or the given directory."""
    if resume == "auto":
        return latest_checkpoint(output_dir)
    if resume in ("none", ""):
        return None
    return Path(resume)


def save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, position: int) -> Path:
    """Written to a temporary directory, then renamed: a crash never leaves a half checkpoint."""
    root = output_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(
        dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
             rng=rng_state(), position=position, step=step),
        tmp / "state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple:
    """Restore a checkpoint into model, optimizer, scheduler and the RNGs; returns (step, position)."""
    state = torch.load(path / "state.pt", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], state["position"]
