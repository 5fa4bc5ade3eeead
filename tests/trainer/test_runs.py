"""Training runs on tiny models: the CLI, resume, loss inputs, reference modes, DDP and FSDP on gloo,
every loss option reaching the loss; output directories, checkpoints and caches that are reused,
hostile, or written to a full disk."""

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

from tiny_runs import ROOT, SHARDED_OK, config, losses, needs_sharded_torch, task_files, torchrun, write_jsonl  # noqa: E402

from safedpo.config import load_config  # noqa: E402


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return task_files(tmp_path_factory.mktemp("task"))


def test_cli_full_run_writes_metrics_and_loadable_model(task, tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg = config(task, tmp_path / "run", max_steps=3, eval_every=2)
    cfg.save(cfg_file)
    res = subprocess.run([sys.executable, "-m", "safedpo", "train", "--config", str(cfg_file), "log_every=1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "run"
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in records if "step" in r and "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["tokens_per_s"] > 0 for r in steps)
    assert "eval_safe_over_unsafe" in steps[1]
    assert (out / "config.yaml").exists() and (out / "checkpoints" / "step-3" / "state.pt").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    tok = AutoTokenizer.from_pretrained(str(out / "final"))
    assert model.config.vocab_size == len(tok)
    # The trained weights are what was saved, and they moved away from the initial ones.
    state = torch.load(out / "checkpoints" / "step-3" / "state.pt", weights_only=True)["model"]
    for name, p in model.state_dict().items():
        assert torch.equal(p, state[name])
    bad = subprocess.run([sys.executable, "-m", "safedpo", "train", "--config", str(cfg_file), "nope=1"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert bad.returncode == 2 and "unknown config key: nope" in bad.stderr


def test_resume_equivalence(task, tmp_path):
    from safedpo.train import train

    train(config(task, tmp_path / "straight", max_steps=6))
    train(config(task, tmp_path / "resumed", max_steps=6, stop_at_step=3))  # an interrupted job
    train(config(task, tmp_path / "resumed", max_steps=6, resume="auto"))
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(a) == 6 and len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6


def test_logits_and_linear_inputs_give_the_same_loss(task, tmp_path):
    from safedpo.train import train

    train(config(task, tmp_path / "logits", max_steps=2, loss_input="logits"))
    train(config(task, tmp_path / "linear", max_steps=2, loss_input="linear"))
    a, b = losses(tmp_path / "logits"), losses(tmp_path / "linear")
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5


def test_precompute_and_live_reference_give_the_same_loss(task, tmp_path):
    from safedpo.train import train

    train(config(task, tmp_path / "pre", max_steps=3, reference="precompute"))
    assert list((tmp_path / "cache").glob("ref-*.pt"))
    train(config(task, tmp_path / "live", max_steps=3, reference="live"))
    a, b = losses(tmp_path / "pre"), losses(tmp_path / "live")
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5


@pytest.mark.xdist_group("processes")
def test_torchrun_two_processes_match_one(task, tmp_path):
    """2 ranks x 2 pairs (gloo) versus 1 rank x 4 pairs: the same global batches, the same losses."""
    from safedpo.train import train

    train(config(task, tmp_path / "one", max_steps=3, batch_size=4))
    torchrun(config(task, tmp_path / "two", max_steps=3, batch_size=2))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5
    if not SHARDED_OK:
        return
    # FSDP2 (fully_shard, gloo on the CPU): the same losses, and a final model gathered from the shards.
    torchrun(config(task, tmp_path / "fsdp", max_steps=3, batch_size=2, fsdp=True))
    c = losses(tmp_path / "fsdp")
    assert max(abs(x - y) for x, y in zip(a, c)) <= 1e-5
    from transformers import AutoModelForCausalLM

    one = AutoModelForCausalLM.from_pretrained(str(tmp_path / "one" / "final")).state_dict()
    sharded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fsdp" / "final")).state_dict()
    assert max((one[k] - sharded[k]).abs().max().item() for k in one) <= 1e-4


@pytest.mark.parametrize("fsdp, tensor_parallel", [(True, 1), (False, 2)])
def test_sharded_training_on_a_torch_that_trains_it_differently_is_refused(monkeypatch, fsdp, tensor_parallel):
    """torch 2.7's FSDP2 gave another loss from the third step on (and refused the 2-D mesh): sharded
    training there is an error naming the setting and the torch it needs, never a different model."""
    import types

    from safedpo import distributed

    dd = types.SimpleNamespace(world=4, tensor_parallel=tensor_parallel, data_world=4 // tensor_parallel)
    monkeypatch.setattr(distributed, "release", lambda: (2, 7))
    with pytest.raises(RuntimeError, match=("fsdp" if fsdp else "tensor_parallel over several") + r".* needs torch >= 2\.11"):
        distributed.wrap_distributed(torch.nn.Linear(2, 2), fsdp, dd)
    dd.world = 1  # one process: nothing to wrap, on any torch
    assert isinstance(distributed.wrap_distributed(torch.nn.Linear(2, 2), fsdp, dd), torch.nn.Linear)


@pytest.mark.xdist_group("processes")
@needs_sharded_torch
def test_fsdp_resume_is_bitwise_equal(task, tmp_path):
    """FSDP2 on 2 gloo ranks: sharded checkpoints (torch.distributed.checkpoint); an interrupted run resumed
    on the same number of ranks gives bitwise the losses and final weights of an uninterrupted one."""
    from transformers import AutoModelForCausalLM

    def run(name, **kw):
        torchrun(config(task, tmp_path / name, batch_size=2, fsdp=True, **kw))

    run("straight", max_steps=4)
    run("resumed", max_steps=4, save_every=2, stop_at_step=2)
    shards = tmp_path / "resumed" / "checkpoints" / "step-2"
    assert (shards / "shards").is_dir() and (shards / "rng-1.pt").exists()
    run("resumed", max_steps=4, save_every=2, resume="auto")
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(a) == len(b) == 4 and a == b
    one = AutoModelForCausalLM.from_pretrained(str(tmp_path / "straight" / "final")).state_dict()
    two = AutoModelForCausalLM.from_pretrained(str(tmp_path / "resumed" / "final")).state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)


# The T flags of each mode, written out here rather than read from the code under test.
MODE_FLAGS = {"safedpo": (True, True), "noswap": (False, True), "dpo-helpful": (False, False)}


@pytest.mark.parametrize("loss_type, options", [
    ("sigmoid", dict(mode="safedpo", label_smoothing=0.1)),
    ("robust", dict(mode="noswap", label_smoothing=0.2)),
    ("hinge", dict(mode="safedpo", reduction="sum")),
    ("ipo", dict(mode="safedpo", average_logps=True)),
    ("sigmoid", dict(mode="dpo-helpful", loss_input="linear")),
])
def test_every_loss_option_reaches_the_loss(task, tmp_path, loss_type, options):
    """loss_type, beta, delta, label_smoothing, average_logps, the mode's swap/drop and reduction all reach
    the loss in training (the first step's logged loss) and in evaluation (the final eval_loss): each equals
    safedpo_loss_from_logps on float64 log-probs of the same models and batches."""
    from transformers import AutoModelForCausalLM

    from safedpo.collate import batch_stream, make_batch
    from safedpo.data import data_sources, load_examples
    from safedpo.model import build_model, load_tokenizer
    from safedpo.train import train
    from safedpo_kernels import reference, safedpo_loss_from_logps

    # A reference model other than the initial policy, so that beta matters from the first step on.
    tok = load_tokenizer(task["tokenizer"])
    ref_dir = tmp_path / "ref"
    build_model(config(task, tmp_path / "unused", seed=11), len(tok), torch.device("cpu")).save_pretrained(ref_dir)
    cfg = config(task, tmp_path / "run", max_steps=1, batch_size=6, beta=0.3, delta=1.5, loss_type=loss_type,
                 reference_model=str(ref_dir), **options)
    train(cfg)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    step_loss = next(r["loss"] for r in records if r.get("step") == 1 and "event" not in r)
    eval_loss = next(r["eval_loss"] for r in records if r.get("event") == "eval")

    swap, drop = MODE_FLAGS[cfg.mode]
    delta = cfg.delta if cfg.mode in ("safedpo", "noswap") else 0.0
    ref_model = AutoModelForCausalLM.from_pretrained(ref_dir)

    def expected(policy_model, examples, indices):
        batch = make_batch(examples, indices, tok.pad_token_id, False, torch.device("cpu"))
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with torch.no_grad():
            logps = [reference.sequence_logps(m(**inputs).logits.double(), batch["labels"], average=cfg.average_logps)
                     for m in (policy_model, ref_model)]
        return safedpo_loss_from_logps(logps[0], logps[1], batch["chosen_safe"], batch["rejected_safe"], beta=0.3,
                                       delta=delta, swap=swap, drop_both_unsafe=drop, label_smoothing=cfg.label_smoothing,
                                       loss_type=loss_type, reduction=options.get("reduction", "mean")).loss.item()

    train_set, _ = load_examples(cfg, tok, data_sources(cfg, "train"))
    _, first = next(batch_stream([len(e) for e in train_set], cfg.batch_size, cfg.seed))
    want = expected(build_model(cfg, len(tok), torch.device("cpu")), train_set, first)
    assert abs(step_loss - want) <= 1e-4 * max(1.0, abs(want)), (step_loss, want)
    eval_set, _ = load_examples(cfg, tok, data_sources(cfg, "eval"))
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    want = expected(trained, eval_set, list(range(len(eval_set))))  # evaluation runs in batches: the same total
    assert abs(eval_loss - want) <= 1e-4 * max(1.0, abs(want)), (eval_loss, want)


# ----------------------------------------------------------------------------- reused, hostile, full


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
    assert load_config(str(out / "config.yaml")).mode == "dpo-helpful"


def test_resume_refuses_another_configuration_unless_told(stand_ins, tmp_path, capsys):
    """A changed schedule (max_steps: the learning rate would jump), mode or loss option is refused with
    the keys named; resume_check: false goes on and says what changed."""
    from safedpo.train import train

    out = tmp_path / "run"
    train(run_cfg(stand_ins, out, max_steps=4, stop_at_step=2))
    with pytest.raises(ValueError, match=r"max_steps: 4 -> 6.*resume_check: false"):
        train(run_cfg(stand_ins, out, max_steps=6))
    with pytest.raises(ValueError, match=r"mode: 'safedpo' -> 'noswap'; loss_type: 'sigmoid' -> 'hinge'"):
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

    monkeypatch.setattr(train_module, "Reference", no_reference)
    data = write_jsonl(tmp_path / "all-bad.jsonl", rows)
    with pytest.raises(ValueError, match=f"too little training data: all {len(rows)} rows were malformed and skipped"):
        train_module.train(run_cfg(stand_ins, tmp_path / "bad", train_files=[data], skip_bad_rows=True))


@pytest.mark.parametrize("compile_backend, loss_input, checkpointing",
                         [("aot_eager", "logits", True), ("aot_eager", "linear", True), ("inductor", "linear", False)])
def test_a_compiled_policy_trains_as_the_eager_one(task, tmp_path, compile_backend, loss_input, checkpointing):
    """compile: true (torch.compile of the policy's forward and the loss) gives the eager run's losses, and
    the tiny Llama's step compiles without a graph break (the kernels' value checks are off; the token ids
    were checked when the data was loaded), with activation checkpointing too (transformers >= 5.25 with
    the kernels package wraps every attention layer's forward in a set-and-restore of a global, which
    dynamo refuses inside the checkpoint's higher-order op unless the step runs under compile_context)."""
    from torch._dynamo.utils import counters

    from safedpo.train import train

    train(config(task, tmp_path / "eager", max_steps=2, loss_input=loss_input))
    counters.clear()
    train(config(task, tmp_path / "compiled", max_steps=2, loss_input=loss_input, compile=True,
                 compile_backend=compile_backend, gradient_checkpointing=checkpointing))
    assert not counters["graph_break"], dict(counters["graph_break"])
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(a) == len(b) == 2 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)


@pytest.mark.parametrize("loss_input", ["logits", "linear"])
def test_the_policy_breaks_the_graph_only_when_it_validates(loss_input):
    """validate=False (what compile: true sets): one graph for the tiny Llama's forward and the loss;
    validate=True: the kernels' label and flag checks read values on the host, breaking it."""
    import torch._dynamo
    from transformers import LlamaConfig, LlamaForCausalLM

    from safedpo.model import PolicyLogps
    from safedpo_kernels.options import LossOptions

    gen = torch.Generator().manual_seed(5)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa"))
    ids = torch.randint(0, 97, (4, 9), generator=gen)
    labels = ids.masked_fill(torch.arange(9) < 3, -100)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, chosen_safe=torch.tensor([1, 0]),
                 rejected_safe=torch.tensor([0, 0]))
    breaks = {}
    for validate in (True, False):
        torch._dynamo.reset()
        policy = PolicyLogps(model, loss_input, validate=validate)
        explained = torch._dynamo.explain(policy)(batch, LossOptions(), torch.zeros(4))
        breaks[validate] = explained.graph_break_count
    assert breaks[False] == 0 and breaks[True] > 0, breaks


def test_token_ids_past_the_models_vocabulary_are_refused(task, tmp_path):
    """A tokenizer larger than the model (added tokens, no resize): one message before any step, naming
    the id and the vocabulary, instead of an index error inside the embedding."""
    from safedpo.train import train

    with pytest.raises(ValueError, match=r"the training data has token id \d+ but the model's vocabulary has 20 entries"):
        train(config(task, tmp_path / "small", max_steps=1, tiny_model={"vocab_size": 20}))
    assert not (tmp_path / "small" / "checkpoints").exists()
