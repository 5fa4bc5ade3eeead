"""When a run goes wrong: a divergence (a weight becomes NaN), a transient non-finite batch, preemption
(SIGTERM to the process, or to torchrun above two ranks), a second signal, and resume: auto where there
is no checkpoint. Faults come from faults.py, inside the run's own processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from tiny_runs import ROOT, config, losses, safedpo_train, torchrun  # noqa: E402


def strict_records(out) -> list:
    """metrics.jsonl read as strict JSON (NaN or Infinity fails)."""

    def refuse(name):
        raise AssertionError(f"metrics.jsonl holds {name}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in open(out / "metrics.jsonl")]


def tensors_of(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_of(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_of(v)


def checkpoint_state(out, step) -> dict:
    return torch.load(out / "checkpoints" / f"step-{step}" / "state.pt", weights_only=True)


def final_weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def steps(out) -> list:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))


@pytest.mark.xdist_group("processes")
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_diverged_run_stops_at_the_step_and_keeps_its_last_good_checkpoint(task, tmp_path, ranks):
    """A weight becomes NaN after the third optimizer step (on one rank of two): step 4's loss is
    non-finite, the update is not applied, the run stops (status 3, or torchrun's failure naming it) with
    one line naming the step, the micro-batch and the last good checkpoint, which rotation
    (save_total_limit: 1) kept: finite, and nothing non-finite written after it."""
    out = tmp_path / "run"
    cfg = config(task, out, max_steps=8, save_every=2, save_total_limit=1, batch_size=4 // ranks)
    fault = dict(mode="nan-weight", step=3, rank=1 if ranks == 2 else None)
    res = torchrun(cfg, fault=fault, check=False) if ranks == 2 else safedpo_train(cfg, fault=fault, check=False)
    assert res.returncode != 0, res.stderr[-3000:]
    if ranks == 1:
        assert res.returncode == 3, res.stderr[-3000:]
    assert "step 4: the loss of micro-batch 1 of 1 is not finite" in res.stderr, res.stderr[-3000:]
    assert f"The last good checkpoint is {out / 'checkpoints' / 'step-2'}" in res.stderr
    assert steps(out) == [2] and not (out / "final").exists()
    state = checkpoint_state(out, 2)
    assert all(torch.isfinite(t).all() for t in tensors_of(state) if t.is_floating_point())
    records = strict_records(out)
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3]
    assert [(r["step"], r["nonfinite"], r["action"]) for r in records if r.get("event") == "nonfinite"] == \
        [(4, "loss", "error")]
    diagnosis = json.loads((out / "nonfinite-step-4.json").read_text())
    assert diagnosis["nonfinite"] == "loss" and diagnosis["micro_batches"] == [1]
    assert len(diagnosis["pairs"]) == 1 and len(diagnosis["pairs"][0]) == 4  # the global batch's pair indices
    if ranks == 1:  # this rank's loss was the non-finite one: its pairs' outputs are kept
        (pairs,) = diagnosis["nonfinite_pairs"]
        assert pairs["micro_batch"] == 0 and len(pairs["chosen_logps"]) == 4


def test_a_run_without_a_checkpoint_says_so_at_resume(task, tmp_path):
    """Diverged before its first save: the message says there is no checkpoint; resume: auto then says
    there is none to continue and what to do (not 'set resume: auto')."""
    from safedpo.train import train

    out = tmp_path / "run"
    cfg = config(task, out, max_steps=4)
    res = safedpo_train(cfg, fault=dict(mode="nan-weight", step=1), check=False)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "step 2: the loss of micro-batch 1 of 1 is not finite" in res.stderr and "No checkpoint was written yet" in res.stderr
    assert not (out / "checkpoints").exists() and (out / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="holds another run .metrics.jsonl. but no checkpoint to continue.*overwrite_output_dir"):
        train(config(task, out, max_steps=4))


def poison_batches(monkeypatch, which):
    """The training forward's loss becomes NaN for the micro-batches whose 1-based call number is in
    ``which`` (a transient fault in the data or the numerics, not in the weights)."""
    from safedpo.model import PairScorer

    original = PairScorer.forward
    calls = [0]

    def poisoned(self, batch, loss=None, ref_logps=None, denominators=None):
        out = original(self, batch, loss, ref_logps, denominators)
        if loss is not None and torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] in which:
                out = out._replace(result=out.result._replace(loss=out.result.loss * float("nan")))
        return out

    monkeypatch.setattr(PairScorer, "forward", poisoned)


def test_skip_mode_steps_over_one_non_finite_batch_and_resumes_exactly(task, tmp_path, monkeypatch):
    """nonfinite: skip with one poisoned batch (step 3): the run finishes with finite weights; step 3
    consumed its batch and advanced the schedule, its weights and optimizer state are step 2's; it is
    logged as skipped with a null loss; a run stopped right after it and resumed ends bitwise where the
    uninterrupted one does."""
    from safedpo.train import train

    kw = dict(max_steps=5, save_every=1, nonfinite="skip")
    poison_batches(monkeypatch, {3})
    straight = tmp_path / "straight"
    train(config(task, straight, **kw))
    records = strict_records(straight)
    logged = {r["step"]: r for r in records if "event" not in r}
    assert logged[3]["skipped"] is True and logged[3]["loss"] is None and logged[3]["nonfinite"] == "loss"
    assert all("skipped" not in logged[s] and logged[s]["loss"] is not None for s in (1, 2, 4, 5))
    s2, s3 = checkpoint_state(straight, 2), checkpoint_state(straight, 3)
    assert all(torch.equal(s2["model"][k], s3["model"][k]) for k in s2["model"])
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(s2["optimizer"]), tensors_of(s3["optimizer"])))
    assert s3["scheduler"]["last_epoch"] == s2["scheduler"]["last_epoch"] + 1
    meta = [json.loads((straight / "checkpoints" / f"step-{s}" / "meta.json").read_text()) for s in (2, 3)]
    assert meta[1]["position"] > meta[0]["position"] and meta[1]["counters"]["skipped_steps"] == 1
    weights = final_weights(straight)
    assert all(torch.isfinite(t).all() for t in weights.values())

    poison_batches(monkeypatch, {3})
    resumed = tmp_path / "resumed"
    train(config(task, resumed, stop_at_step=3, **kw))
    poison_batches(monkeypatch, set())  # the fault was transient: the resumed run does not meet it again
    train(config(task, resumed, **kw))
    assert [r.get("loss") for r in strict_records(resumed) if "event" not in r] == [logged[s]["loss"] for s in range(1, 6)]
    again = final_weights(resumed)
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_skip_mode_stops_after_max_nonfinite_steps_in_a_row(task, tmp_path, monkeypatch):
    from safedpo.guards import NonFiniteError
    from safedpo.train import train

    poison_batches(monkeypatch, set(range(2, 100)))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"steps 2-3: 2 non-finite steps in a row \(max_nonfinite_steps: 2\); "
                                             r"the weights are those of step 1"):
        train(config(task, out, max_steps=6, save_every=1, nonfinite="skip", max_nonfinite_steps=2))
    assert steps(out) == [1, 2]  # step 2 (skipped) kept step 1's finite weights; step 3 stopped the run
    strict_records(out)


@pytest.mark.parametrize("clip", [1.0, 0.0])  # the clipping's norm checks them, or a pass of their own
def test_non_finite_gradients_of_a_finite_loss_are_named(task, tmp_path, monkeypatch, clip):
    from safedpo import train as train_module
    from safedpo.guards import NonFiniteError

    build = train_module.build_model

    def with_an_inf_gradient(*args, **kwargs):
        model = build(*args, **kwargs)
        list(model.parameters())[-1].register_hook(lambda g: torch.full_like(g, float("inf")))
        return model

    monkeypatch.setattr(train_module, "build_model", with_an_inf_gradient)
    with pytest.raises(NonFiniteError, match=r"step 1: the gradients are not finite \(the loss of each of the 1 "
                                             r"micro-batches was\)\. The update was not applied"):
        train_module.train(config(task, tmp_path / "run", max_steps=2, clip_grad_norm=clip))
    assert [r["nonfinite"] for r in strict_records(tmp_path / "run") if r.get("event") == "nonfinite"] == ["gradients"]


def test_non_finite_weights_are_never_saved(task, tmp_path, monkeypatch):
    """A weight becomes NaN in step 2's update (its loss and gradients were finite): the checkpoint of step
    2 is refused, and rotation (save_total_limit: 1) has kept step 1's."""
    import faults

    from safedpo.guards import NonFiniteError
    from safedpo.train import train

    monkeypatch.setattr(torch.optim.AdamW, "step", torch.optim.AdamW.step)  # put back after the test
    faults.install("nan-weight", 2)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step 2: the model's weights are non-finite; nothing was saved\. "
                                             r"The last good checkpoint is .*step-1 \(resume: auto"):
        train(config(task, out, max_steps=4, save_every=1, save_total_limit=1))
    assert steps(out) == [1] and not (out / "final").exists()


def test_sigterm_checkpoints_and_resume_equals_an_uninterrupted_run(task, tmp_path):
    """SIGTERM during step 3: the step finishes, a checkpoint of it is written, status 75 and a line
    saying how to resume; the same command then ends bitwise where an uninterrupted run ends."""
    straight = tmp_path / "straight"
    safedpo_train(config(task, straight, max_steps=6))
    out = tmp_path / "stopped"
    cfg = config(task, out, max_steps=6)
    res = safedpo_train(cfg, fault=dict(mode="sigterm", step=3), check=False)
    assert res.returncode == 75, res.stderr[-3000:]
    assert f"stopped by SIGTERM after step 3 of 6; checkpoint {out / 'checkpoints' / 'step-3'} is written" in res.stderr
    assert steps(out) == [3] and not (out / "final").exists()
    assert [r["step"] for r in strict_records(out) if r.get("event") == "interrupted"] == [3]
    res = safedpo_train(cfg)
    assert "resumed from" in res.stderr and "at step 3" in res.stderr
    assert losses(out) == losses(straight)
    a, b = final_weights(straight), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.xdist_group("processes")
def test_sigterm_to_torchrun_stops_both_ranks_at_one_step(task, tmp_path):
    """torchrun forwards a SIGTERM it gets to its two workers: they agree on one step, write one
    checkpoint inside torchrun's grace period, and torchrun reports failure (it re-raises the signal);
    resume: auto under torchrun ends bitwise where an uninterrupted 2-rank run ends. (How many steps the
    workers finish before torchrun's signal reaches them depends on the machine's load: 12 steps leave
    room for it to land mid-run.)"""
    steps_in_run = 12
    straight = tmp_path / "straight"
    torchrun(config(task, straight, max_steps=steps_in_run, batch_size=2))
    out = tmp_path / "stopped"
    cfg = config(task, out, max_steps=steps_in_run, batch_size=2)
    res = torchrun(cfg, fault=dict(mode="sigterm-parent", step=3, rank=0), check=False)
    assert res.returncode != 0, res.stderr[-3000:]
    (stopped_at,) = steps(out)  # one checkpoint, of the step both ranks stopped after
    assert 3 <= stopped_at < steps_in_run, stopped_at
    assert f"stopped by SIGTERM after step {stopped_at} of {steps_in_run}" in res.stderr, res.stderr[-3000:]
    assert not (out / "final").exists()
    torchrun(cfg)
    assert losses(out) == losses(straight)
    a, b = final_weights(straight), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stop_signals_a_second_one_stops_at_once(monkeypatch):
    """The first SIGINT is remembered (the run stops after its step); a copy of it within DUPLICATE_S is
    the same request; a later one raises KeyboardInterrupt at once; the previous handlers come back."""
    from safedpo import guards

    before = signal.getsignal(signal.SIGINT)
    with guards.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)  # a duplicate: ignored
        time.sleep(0.05)
        monkeypatch.setattr(guards, "DUPLICATE_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_sigterm_ends_the_process():
    code = ("import os, signal, time; from safedpo import guards; guards.DUPLICATE_S = 0.0\n"
            "with guards.StopSignals() as s:\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1); assert s.signum == signal.SIGTERM\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
            "print('still running')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == -signal.SIGTERM and "still running" not in res.stdout, (res.returncode, res.stderr)
    assert "second SIGTERM: stopping now" in res.stderr


def test_metrics_are_strict_json(tmp_path):
    from safedpo.run_dir import MetricsLog

    log = MetricsLog(tmp_path, True, False)
    log.write(dict(step=1, loss=float("nan"), margin=float("inf"), nested=dict(a=[1.0, float("-inf")])), 1)
    log.close()
    assert strict_records(tmp_path) == [dict(step=1, loss=None, margin=None, nested=dict(a=[1.0, None]))]
