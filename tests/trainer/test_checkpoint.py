"""safedpo/checkpoint.py on its own: a checkpoint restores model, optimizer, schedule, RNGs, data
position and counters exactly; rotation keeps the newest; a failed write leaves the complete ones."""

import json
import random

import numpy as np
import pytest
import torch

from safedpo.checkpoint import (
    Position,
    TrainState,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    remove_leftovers,
    resume_point,
    save_checkpoint,
    saved_config,
    saved_counters,
)


def setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def step(model, opt, sched):
    loss = model(torch.randn(4, 5)).pow(2).sum()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_a_restored_checkpoint_continues_bitwise(tmp_path):
    model, opt, sched = setup()
    for _ in range(3):
        step(model, opt, sched)
    path = save_checkpoint(tmp_path, TrainState(model, opt, sched), Position(3, 7, dict(lr=0.01), dict(skipped_steps=2)))
    draws = (random.random(), float(np.random.rand()), torch.rand(1).item())
    step(model, opt, sched)
    want = [p.detach().clone() for p in model.parameters()]

    other, opt2, sched2 = setup(seed=1)
    assert load_checkpoint(path, TrainState(other, opt2, sched2)) == (3, 7)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == draws  # the RNGs came back
    step(other, opt2, sched2)
    assert all(torch.equal(a, b) for a, b in zip(want, other.parameters()))
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert saved_config(path) == dict(lr=0.01) and saved_counters(path) == dict(skipped_steps=2)
    state = torch.load(path / "state.pt", weights_only=True)  # tensors and plain containers only
    assert set(state) == {"model", "optimizer", "scheduler", "rng"}


def test_rotation_keeps_the_newest_and_leftovers_go(tmp_path):
    model, opt, sched = setup()
    for k in (1, 2, 3, 10):
        save_checkpoint(tmp_path, TrainState(model, opt, sched), Position(k, k), keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-3", "step-10"]  # by step, not by name
    assert latest_checkpoint(tmp_path).name == "step-10" and resume_point("auto", tmp_path).name == "step-10"
    assert resume_point("none", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        resume_point(str(tmp_path / "nowhere"), tmp_path)
    (tmp_path / "checkpoints" / ".tmp-step-11-123").mkdir()
    assert remove_leftovers(tmp_path) == [".tmp-step-11-123"] and len(checkpoints(tmp_path)) == 2


def test_a_failed_write_keeps_the_complete_checkpoints(tmp_path, monkeypatch):
    from safedpo.outputs import OutputError

    model, opt, sched = setup()
    save_checkpoint(tmp_path, TrainState(model, opt, sched), Position(1, 1))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError, match=r"cannot write checkpoint .*step-2: the disk is full.*intact \(step-1\)"):
        save_checkpoint(tmp_path, TrainState(model, opt, sched), Position(2, 2), keep=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]
    assert json.loads((tmp_path / "checkpoints" / "step-1" / "meta.json").read_text())["step"] == 1
