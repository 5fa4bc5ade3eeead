"""The run directory: another run's files, overwrite_output_dir, resume's configuration check, reruns,
outputs that cannot be written, a full disk, hostile checkpoints and caches, and malformed rows."""

import errno
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from tiny_runs import ROOT, write_jsonl  # noqa: E402

from safedpo.config import load_config  # noqa: E402


def run_cfg(stand_ins, out, **kw):
    base = dict(model=stand_ins["model"], train_files=[stand_ins["train_jsonl"]], output_dir=str(out), max_steps=3,
                batch_size=2, progress=False, max_length=48, max_prompt_length=24, cache_dir=str(out.parent / "cache"))
    return load_config(None, **{**base, **kw})


def steps_in(out):
    return [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "event" not in r]


def test_a_fresh_run_refuses_another_runs_directory(stand_ins, tmp_path):
    from safedpo.train import train

    out = tmp_path / "run"
    train(run_cfg(stand_ins, out, max_steps=2))
    with pytest.raises(ValueError, match="holds another run.*overwrite_output_dir"):
        train(run_cfg(stand_ins, out, resume="none"))
    train(run_cfg(stand_ins, out, resume="none", overwrite_output_dir=True))
    assert steps_in(out) == [1, 2, 3]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-3"]


def records_in(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_overwrite_starts_afresh_even_where_resume_auto_finds_a_checkpoint(stand_ins, tmp_path):
    """overwrite_output_dir over a finished run (resume: auto, the default, finds its checkpoint): the old
    run's checkpoints, metrics and model go, and the new configuration trains from the start."""
    from safedpo.train import train

    out = tmp_path / "run"
    train(run_cfg(stand_ins, out, max_steps=2))
    old = (out / "final" / "model.safetensors").read_bytes()
    changed = dict(max_steps=2, mode="dpo-helpful", delta=2.0, lr=1e-3)
    train(run_cfg(stand_ins, out, overwrite_output_dir=True, **changed))
    train(run_cfg(stand_ins, tmp_path / "fresh", **changed))
    from safetensors.torch import load_file

    got, fresh = load_file(out / "final" / "model.safetensors"), load_file(tmp_path / "fresh" / "final" / "model.safetensors")
    assert (out / "final" / "model.safetensors").read_bytes() != old
    assert max((got[k] - fresh[k]).abs().max().item() for k in fresh) <= 1e-6
    assert steps_in(out) == [1, 2] and [r["event"] for r in records_in(out) if "event" in r] == ["start"]
    assert load_config(str(out / "config.yaml")).data.mode == "dpo-helpful"


def test_resume_refuses_another_configuration_unless_told(stand_ins, tmp_path, capsys):
    """A changed schedule (max_steps: the learning rate would jump), mode or loss option is refused with
    the keys named; resume_check: false goes on and says what changed."""
    from safedpo.train import train

    out = tmp_path / "run"
    train(run_cfg(stand_ins, out, max_steps=4, stop_at_step=2))
    with pytest.raises(ValueError, match=r"max_steps: 4 -> 6.*resume_check: false"):
        train(run_cfg(stand_ins, out, max_steps=6))
    with pytest.raises(ValueError, match=r"mode: 'safedpo' -> 'noswap'; loss_type: \['sigmoid'\] -> \['hinge'\]"):
        train(run_cfg(stand_ins, out, max_steps=4, mode="noswap", loss_type="hinge"))
    assert steps_in(out) == [1, 2]  # nothing was written by the refused runs
    train(run_cfg(stand_ins, out, max_steps=6, resume_check=False))
    assert "resuming" in capsys.readouterr().err and steps_in(out) == [1, 2, 3, 4, 5, 6]


def test_a_rerun_of_a_finished_run_says_so_and_adds_no_records(stand_ins, tmp_path, capsys):
    from safedpo.train import train

    out = tmp_path / "run"
    cfg = run_cfg(stand_ins, out, max_steps=2, eval_files=[str(stand_ins["paths"]["test"])])
    train(cfg)
    train(cfg)
    err = capsys.readouterr().err
    assert err.count(f"resumed from {out / 'checkpoints' / 'step-2'} at step 2") == 1
    events = [r["event"] for r in records_in(out) if "event" in r]
    assert events == ["start", "resume", "eval"] and steps_in(out) == [1, 2]


def test_outputs_that_cannot_be_written_are_one_line(stand_ins, tmp_path, monkeypatch):
    """An output path that is a file, or a read-only file system: one line naming the path and the fix,
    from the CLI as from train()."""
    import errno
    import pathlib

    from safedpo.outputs import OutputError
    from safedpo.train import train

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg_file = tmp_path / "run.yaml"
    run_cfg(stand_ins, blocker / "run").save(cfg_file)
    res = subprocess.run([sys.executable, "-m", "safedpo", "train", "--config", str(cfg_file)], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"cannot write output_dir {blocker / 'run'}: a file is in the way" in res.stderr
    assert "remove that file or choose another output_dir" in res.stderr

    real_write = pathlib.Path.write_text

    def read_only(self, *a, **k):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", read_only)
    with pytest.raises(OutputError, match=r"cannot write output_dir .*ro: the file system is read-only; choose an "
                                          r"output_dir on a writable file system"):
        train(run_cfg(stand_ins, tmp_path / "ro"))


def test_resume_truncates_the_metrics_and_keeps_k_checkpoints(stand_ins, tmp_path):
    from safedpo.train import train

    out = tmp_path / "run"
    train(run_cfg(stand_ins, out, max_steps=6, save_every=1, save_total_limit=2, stop_at_step=4))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-3", "step-4"]
    # A crash after step 4 was logged but before step 4... was saved: pretend step 5 was logged too.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(dict(step=5, loss=1.0)) + "\n")
    (out / "checkpoints" / ".tmp-step-5-123").mkdir()  # a crash mid-save
    train(run_cfg(stand_ins, out, max_steps=6, save_every=1, save_total_limit=2, resume="auto"))
    assert steps_in(out) == [1, 2, 3, 4, 5, 6]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-5", "step-6"]


def test_a_full_disk_is_named_and_the_last_checkpoint_stays(stand_ins, tmp_path, monkeypatch):
    """A full disk while saving -- torch.save reports it as a RuntimeError from its zip writer, or an
    OSError: one line naming the checkpoint and the fix, nothing half-written left, and the last complete
    checkpoint resumes."""
    from safedpo import checkpoint, outputs
    from safedpo.train import train

    out = tmp_path / "run"
    train(run_cfg(stand_ins, out, max_steps=4, stop_at_step=2))
    real_save = torch.save
    failures = (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1152 vs 1046"),
                OSError(errno.ENOSPC, "No space left on device"))
    for failure in failures:
        def full(obj, path, *a, failure=failure, **k):
            real_save(obj, path, *a, **k)  # part of it is on disk
            raise failure

        monkeypatch.setattr(checkpoint.torch, "save", full)
        monkeypatch.setattr(outputs, "free_bytes", lambda path: 1 << 20)
        with pytest.raises(outputs.OutputError, match=r"cannot write checkpoint .*step-4: the disk is full .*intact "
                                                      r"\(step-2\); free some space"):
            train(run_cfg(stand_ins, out, max_steps=4, resume="auto"))
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]  # no .tmp-step-4-<pid>
    monkeypatch.undo()
    train(run_cfg(stand_ins, out, max_steps=4, resume="auto"))  # the last complete checkpoint still resumes
    assert steps_in(out) == [1, 2, 3, 4]


class Exploit:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def old_torch_load_default(monkeypatch):
    """torch.load as torch < 2.6 (which pyproject allows) has it: weights_only=False unless passed, so a
    caller that relies on the default is caught on any installed torch."""
    real_load = torch.load

    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)


def _refused_without_running_code(run, marker):
    with pytest.raises(Exception) as info:
        run()
    assert not marker.exists(), "unpickling the file ran its code"
    assert info.type is pickle.UnpicklingError, info.value


def test_a_hostile_checkpoint_runs_no_code(stand_ins, tmp_path, old_torch_load_default):
    from safedpo.train import train

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil" / "step-1"
    ckpt.mkdir(parents=True)
    with open(ckpt / "state.pt", "wb") as f:
        pickle.dump({"model": Exploit(marker)}, f)
    (ckpt / "meta.json").write_text(json.dumps(dict(step=1, position=1, rng={})))
    cfg = run_cfg(stand_ins, tmp_path / "run", resume=str(ckpt), max_steps=2)
    _refused_without_running_code(lambda: train(cfg), marker)


def test_a_hostile_reference_cache_runs_no_code(stand_ins, tmp_path, old_torch_load_default):
    from safedpo.train import train

    marker = tmp_path / "pwned"
    train(run_cfg(stand_ins, tmp_path / "first", max_steps=1))
    cached = list((tmp_path / "cache").glob("ref-*.pt"))
    assert cached
    for path in cached:
        with open(path, "wb") as f:
            pickle.dump(Exploit(marker), f)
    _refused_without_running_code(lambda: train(run_cfg(stand_ins, tmp_path / "second", max_steps=1)), marker)


def test_skipped_rows_are_said_and_no_usable_row_fails_before_any_model_work(stand_ins, tmp_path, capsys, monkeypatch):
    from safedpo import train as train_module

    rows = [json.loads(line) for line in open(stand_ins["train_jsonl"])]
    rows[3]["better_response_id"] = 7
    data = write_jsonl(tmp_path / "one-bad.jsonl", rows)
    train_module.train(run_cfg(stand_ins, tmp_path / "run", train_files=[data], skip_bad_rows=True, max_steps=1))
    assert f"skipped 1 malformed row(s) of {len(rows)} (skip_bad_rows)" in capsys.readouterr().err
    for r in rows:
        r["better_response_id"] = 7

    def no_reference(*a, **k):
        raise AssertionError("reference log-probs computed for a run without data")

    monkeypatch.setattr(train_module, "ReferenceLogps", no_reference)
    data = write_jsonl(tmp_path / "all-bad.jsonl", rows)
    with pytest.raises(ValueError, match=f"too little training data: all {len(rows)} rows were malformed and skipped"):
        train_module.train(run_cfg(stand_ins, tmp_path / "bad", train_files=[data], skip_bad_rows=True))
