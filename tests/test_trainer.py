"""The trainer: data modes, malformed rows, config, full runs, resume, DDP, loss inputs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from safedpo.config import load_config, loss_flags  # noqa: E402
from safedpo.data import DataError, build_pairs, check_row, flip_safety_labels, load_rows  # noqa: E402
from safedpo.toy import make_task, vocabulary  # noqa: E402
from safedpo.toy.tokenizer import build_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64)


def row(better=0, safer=0, safe0=True, safe1=True, **kw):
    r = dict(prompt="how do i fix the bike ?", response_0="a", response_1="b", is_response_0_safe=safe0,
             is_response_1_safe=safe1, better_response_id=better, safer_response_id=safer)
    r.update(kw)
    return r


# ----------------------------------------------------------------------------- data modes


def test_modes_select_and_order_pairs():
    rows = [
        row(better=0, safer=0, safe0=True, safe1=False),  # preferred safe, other unsafe
        row(better=1, safer=0, safe0=True, safe1=False),  # preferred (1) unsafe, other safe
        row(better=0, safer=1, safe0=False, safe1=False),  # both unsafe
        row(better=1, safer=0, safe0=True, safe1=True),  # both safe
    ]
    helpful = build_pairs(rows, "dpo-helpful")
    assert [(p.chosen, p.rejected) for p in helpful] == [("a", "b"), ("b", "a"), ("a", "b"), ("b", "a")]
    assert [(p.chosen_safe, p.rejected_safe) for p in helpful] == [(True, False), (False, True), (False, False), (True, True)]
    assert [(p.chosen, p.rejected) for p in build_pairs(rows, "safedpo")] == [(p.chosen, p.rejected) for p in helpful]
    harmless = build_pairs(rows, "dpo-harmless")
    assert [(p.chosen, p.rejected) for p in harmless] == [("a", "b"), ("a", "b"), ("b", "a"), ("a", "b")]
    safebetter = build_pairs(rows, "dpo-safebetter")
    assert [(p.chosen, p.rejected, p.chosen_safe) for p in safebetter] == [("a", "b", True), ("b", "a", True)]
    assert loss_flags("safedpo", 5.0) == dict(delta=5.0, swap=True, drop_both_unsafe=True)
    assert loss_flags("noswap", 5.0) == dict(delta=5.0, swap=False, drop_both_unsafe=True)
    for mode in ("dpo-helpful", "dpo-harmless", "dpo-safebetter"):
        assert loss_flags(mode, 5.0) == dict(delta=0.0, swap=False, drop_both_unsafe=False)


def test_label_noise_is_seeded():
    rows = [row(safe0=bool(i % 2), safe1=bool(i % 3)) for i in range(400)]
    assert flip_safety_labels(rows, 0.0, 1) == rows
    flipped = flip_safety_labels(rows, 1.0, 1)
    assert all(f["is_response_0_safe"] != r["is_response_0_safe"] and f["is_response_1_safe"] != r["is_response_1_safe"] for f, r in zip(flipped, rows))
    a, b, c = (flip_safety_labels(rows, 0.2, s) for s in (7, 7, 8))
    assert a == b and a != c
    n = sum(x[k] != r[k] for x, r in zip(a, rows) for k in ("is_response_0_safe", "is_response_1_safe"))
    assert 100 <= n <= 220  # about 20% of 800 flags
    assert rows[0]["is_response_0_safe"] is False  # the input is not modified


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "bad, column, words",
    [
        (dict(response_1=""), "response_1", "non-empty string"),
        (dict(better_response_id=2), "better_response_id", "0 or 1"),
        (dict(is_response_0_safe="maybe"), "is_response_0_safe", "boolean"),
        (dict(safer_response_id=None), "safer_response_id", "missing"),
    ],
)
def test_malformed_rows_named_or_skipped(tmp_path, bad, column, words):
    path = _write_jsonl(tmp_path / "d.jsonl", [row(), row(**bad), row()])
    with pytest.raises(DataError) as info:
        load_rows([path])
    msg = str(info.value)
    assert path in msg and "row 1" in msg and repr(column) in msg and words in msg
    rows, skipped = load_rows([path], skip_bad_rows=True)
    assert len(rows) == 2 and skipped == 1


def test_missing_column_and_remap(tmp_path):
    r = row()
    r["question"] = r.pop("prompt")
    path = _write_jsonl(tmp_path / "d.jsonl", [r])
    with pytest.raises(DataError, match="row 0, column 'prompt': missing"):
        load_rows([path])
    rows, _ = load_rows([path], columns={"prompt": "question"})
    assert rows[0]["prompt"] == "how do i fix the bike ?"
    with pytest.raises(DataError, match="row 0"):
        check_row({}, "row 0")


def test_config_unknown_keys_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("beta: 0.2\nmode: noswap\n")
    cfg = load_config(str(cfg_file), ["delta=5", "loss_input=linear", "train_files=a.jsonl"])
    assert (cfg.beta, cfg.mode, cfg.delta, cfg.loss_input, cfg.train_files) == (0.2, "noswap", 5.0, "linear", ["a.jsonl"])
    cfg_file.write_text("beta: 0.2\nbetta: 1\n")
    with pytest.raises(ValueError, match="unknown config key\\(s\\): betta"):
        load_config(str(cfg_file))
    with pytest.raises(ValueError, match="unknown config key: lrr"):
        load_config(None, ["lrr=1"])
    with pytest.raises(ValueError, match="mode must be one of"):
        load_config(None, ["mode=dpo", "tiny_model={hidden_size: 8}", "train_files=x"]).validate()


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    data = make_task(seed=3, pairs_per_prompt=1)
    paths = dict(train=_write_jsonl(root / "train.jsonl", data["train"][:48]), test=_write_jsonl(root / "test.jsonl", data["test"][:16]))
    build_tokenizer(vocabulary(), root / "tok")
    paths["tokenizer"] = str(root / "tok")
    return paths


def config(task, out, **kw):
    base = dict(train_files=[task["train"]], eval_files=[task["test"]], tokenizer=task["tokenizer"], tiny_model=TINY,
                output_dir=str(out), cache_dir=str(out.parent / "cache"), batch_size=4, max_steps=3, lr=1e-3,
                max_prompt_length=16, max_length=40, progress=False, seed=5, delta=2.0)
    base.update(kw)
    return load_config(None, **base)


def losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(Path(out_dir) / "metrics.jsonl")) if "loss" in r and "event" not in r]


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


def test_torchrun_two_processes_match_one(task, tmp_path):
    """2 ranks x 2 pairs (gloo) versus 1 rank x 4 pairs: the same global batches, the same losses."""
    from safedpo.train import train

    train(config(task, tmp_path / "one", max_steps=3, batch_size=4))
    cfg_file = tmp_path / "two.yaml"
    config(task, tmp_path / "two", max_steps=3, batch_size=2).save(cfg_file)
    # --standalone: a local rendezvous on a free port, so parallel runs on one machine do not collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "safedpo", "train",
           "--config", str(cfg_file)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5
    # FSDP2 (fully_shard, gloo on the CPU): the same losses, and a final model gathered from the shards.
    config(task, tmp_path / "fsdp", max_steps=3, batch_size=2, fsdp=True, resume="none").save(cfg_file)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-4000:]
    c = losses(tmp_path / "fsdp")
    assert max(abs(x - y) for x, y in zip(a, c)) <= 1e-5
    from transformers import AutoModelForCausalLM

    one = AutoModelForCausalLM.from_pretrained(str(tmp_path / "one" / "final")).state_dict()
    sharded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fsdp" / "final")).state_dict()
    assert max((one[k] - sharded[k]).abs().max().item() for k in one) <= 1e-4


def test_fsdp_resume_is_bitwise_equal(task, tmp_path):
    """FSDP2 on 2 gloo ranks: sharded checkpoints (torch.distributed.checkpoint); an interrupted run resumed
    on the same number of ranks gives bitwise the losses and final weights of an uninterrupted one."""
    from transformers import AutoModelForCausalLM

    def torchrun(name, **kw):
        cfg_file = tmp_path / f"{name}.yaml"
        config(task, tmp_path / name, batch_size=2, fsdp=True, **kw).save(cfg_file)
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                              "safedpo", "train", "--config", str(cfg_file)], capture_output=True, text=True, timeout=600,
                             cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
        assert res.returncode == 0, res.stderr[-4000:]

    torchrun("straight", max_steps=4)
    torchrun("resumed", max_steps=4, save_every=2, stop_at_step=2)
    shards = tmp_path / "resumed" / "checkpoints" / "step-2"
    assert (shards / "shards").is_dir() and (shards / "rng-1.pt").exists()
    torchrun("resumed", max_steps=4, save_every=2, resume="auto")
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
