"""Training runs on tiny models: the CLI, resume, loss inputs, reference modes, and every loss option
reaching the loss."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from tiny_runs import ROOT, config, losses  # noqa: E402


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


# The T flags of each mode, written out here rather than read from the code under test.
MODE_FLAGS = {"safedpo": (True, True), "noswap": (False, True), "dpo-helpful": (False, False)}


@pytest.mark.parametrize("loss_type, options", [
    ("sigmoid", dict(mode="safedpo", label_smoothing=0.1)),
    ("robust", dict(mode="noswap", label_smoothing=0.2)),
    ("hinge", dict(mode="safedpo", reduction="sum")),
    ("ipo", dict(mode="safedpo", average_logps=True)),
    ("sigmoid", dict(mode="dpo-helpful", loss_input="linear")),
    (["sigmoid", "sft"], dict(mode="safedpo", loss_weights=[1.0, 0.5])),
    (["sft", "hinge"], dict(mode="noswap", average_logps=True, loss_weights=[0.3, 1.0], loss_input="linear")),
])
def test_every_loss_option_reaches_the_loss(task, tmp_path, loss_type, options):
    """loss_type, beta, delta, label_smoothing, average_logps, the mode's swap/drop and reduction all reach
    the loss in training (the first step's logged loss) and in evaluation (the final eval_loss), loss lists
    with their weights too: each equals the float64 oracle on float64 log-probs of the same models and
    batches (evaluation: the whole set's divisors, although it runs in batches)."""
    from transformers import AutoModelForCausalLM

    from safedpo.collate import batch_stream, make_batch
    from safedpo.data import data_sources, load_examples
    from safedpo.model import build_model, load_tokenizer
    from safedpo.train import train
    from safedpo_kernels import reference

    # A reference model other than the initial policy, so that beta matters from the first step on.
    tok = load_tokenizer(task["tokenizer"])
    ref_dir = tmp_path / "ref"
    build_model(config(task, tmp_path / "unused").model, len(tok), torch.device("cpu"), seed=11).save_pretrained(ref_dir)
    cfg = config(task, tmp_path / "run", max_steps=1, batch_size=6, beta=0.3, delta=1.5, loss_type=loss_type,
                 reference_model=str(ref_dir), **options)
    train(cfg)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    step_loss = next(r["loss"] for r in records if r.get("step") == 1 and "event" not in r)
    eval_loss = next(r["eval_loss"] for r in records if r.get("event") == "eval")

    swap, drop = MODE_FLAGS[cfg.data.mode]
    delta = cfg.loss.delta if cfg.data.mode in ("safedpo", "noswap") else 0.0
    ref_model = AutoModelForCausalLM.from_pretrained(ref_dir)

    def expected(policy_model, examples, indices):
        batch = make_batch(examples, indices, tok.pad_token_id, False, torch.device("cpu"))
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with torch.no_grad():
            logps = [reference.sequence_logps(m(**inputs).logits.double(), batch["labels"], average=cfg.loss.average_logps)
                     for m in (policy_model, ref_model)]
        counts = reference.token_counts(batch["labels"])
        return reference.safedpo_loss_from_logps(
            logps[0], logps[1], batch["chosen_safe"], batch["rejected_safe"], counts, beta=0.3, delta=delta, swap=swap,
            drop_both_unsafe=drop, label_smoothing=cfg.loss.label_smoothing, loss_type=loss_type,
            loss_weights=options.get("loss_weights"), reduction=options.get("reduction", "mean"),
            average=cfg.loss.average_logps).loss.item()

    seed = cfg.optim.seed
    train_set, _ = load_examples(cfg.data, tok, data_sources(cfg.data, "train"), seed)
    _, first = next(batch_stream([len(e) for e in train_set], cfg.optim.batch_size, seed))
    want = expected(build_model(cfg.model, len(tok), torch.device("cpu"), seed=seed), train_set, first)
    assert abs(step_loss - want) <= 1e-4 * max(1.0, abs(want)), (step_loss, want)
    eval_set, _ = load_examples(cfg.data, tok, data_sources(cfg.data, "eval"), seed)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    want = expected(trained, eval_set, list(range(len(eval_set))))  # evaluation runs in batches: the same total
    assert abs(eval_loss - want) <= 1e-4 * max(1.0, abs(want)), (eval_loss, want)


def test_a_router_coefficient_for_a_model_without_a_router_is_refused(task, tmp_path):
    """router_aux_loss_coef on a dense model (the tiny Llama) weights nothing: a ValueError naming the key
    and the model before any step, not a run that silently trains without the loss the user asked for."""
    from safedpo.train import train

    with pytest.raises(ValueError, match="router_aux_loss_coef is 0.05 but LlamaForCausalLM is not a mixture-of-experts"):
        train(config(task, tmp_path / "dense", router_aux_loss_coef=0.05))
    assert not (tmp_path / "dense" / "metrics.jsonl").exists()
