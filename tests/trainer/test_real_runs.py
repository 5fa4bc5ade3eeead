"""From the toy to a real run, with local stand-ins (nothing is downloaded): the recipes, LoRA with
resume and merge, a Hub-style data set from disk, the HH-style converter, and the classifier judge."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from safedpo.config import load_config  # noqa: E402
from safedpo.data import data_sources, load_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def local(stand_ins):
    return stand_ins


def tiny_overrides(local, out: Path, **extra) -> dict:
    return {**dict(model=local["model"], train_dataset=local["data"], train_split="train", eval_split="test",
                   output_dir=str(out), cache_dir=str(out / "cache"), max_steps=2, batch_size=2, grad_accum=1,
                   max_length=48, max_prompt_length=24, eval_every=0, save_every=0, fsdp=False, device="cpu",
                   progress=False), **extra}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_trains_two_steps_with_stand_ins(local, tmp_path, recipe):
    """Each recipe as written (the paper's beta / delta, its mode, loss input, LoRA), with the model and
    the data swapped for tiny local stand-ins."""
    from safedpo.train import train

    written = load_config(str(recipe))
    assert written.loss.beta == 0.1 and written.data.train_dataset == "PKU-Alignment/PKU-SafeRLHF-30K"
    assert written.loss.delta == (10.0 if written.data.mode in ("safedpo", "noswap") else 0.0)
    cfg = load_config(str(recipe), **{k: v for k, v in tiny_overrides(local, tmp_path).items()})
    result = train(cfg)
    assert result["step"] == 2 and result["loss"] == result["loss"]
    assert (tmp_path / "final").is_dir()
    assert "eval_loss" in result  # the test split of the data set


def test_lora_resume_and_merge(local, tmp_path):
    """LoRA: only adapters train; the reference is the model with adapters disabled; an interrupted run
    resumes to the same adapters as a straight one; checkpoints hold the adapters only; merge_lora
    saves a model whose logits equal base + adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from safedpo.train import train

    lora = dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    common = dict(lora=lora, max_steps=4, lr=1e-2, reference="live")
    straight = train(load_config(None, **tiny_overrides(local, tmp_path / "straight", **common)))
    part = tiny_overrides(local, tmp_path / "resumed", **common, save_every=2, stop_at_step=2)
    train(load_config(None, **part))
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "step-2" / "state.pt", weights_only=True)
    assert ckpt["model"] and all("lora_" in k for k in ckpt["model"])  # adapters only
    part.update(stop_at_step=0)
    resumed = train(load_config(None, **part))
    assert resumed["step"] == straight["step"] == 4
    assert abs(resumed["loss"] - straight["loss"]) <= 1e-6

    a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local["model"]), tmp_path / "straight" / "final")
    b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local["model"]), tmp_path / "resumed" / "final")
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        if "lora_" in na:
            assert torch.allclose(pa, pb, atol=1e-6), na
    trained_b = [p for n, p in a.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in trained_b)  # the adapters did train

    merged = train(load_config(None, **tiny_overrides(local, tmp_path / "merged", **common, merge_lora=True)))
    assert merged["step"] == 4
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "final")
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, a.merge_and_unload()(ids).logits, atol=1e-5)


def test_hub_style_dataset_directories(local, tmp_path):
    """A saved DatasetDict, and a directory of data files laid out as on the Hub, load with splits."""
    cfg = load_config(None, **tiny_overrides(local, tmp_path))
    (label, table), = data_sources(cfg.data, "train")
    assert "[train]" in label and len(table) == 24
    rows, skipped = load_rows(data_sources(cfg.data, "eval"))
    assert len(rows) == 8 and skipped == 0

    hub = tmp_path / "hub-layout" / "data"
    hub.mkdir(parents=True)
    for split in ("train", "test"):
        datasets.load_from_disk(local["data"])[split].to_parquet(str(hub / f"{split}-00000-of-00001.parquet"))
    cfg = load_config(None, **tiny_overrides(local, tmp_path, train_dataset=str(hub.parent)))
    assert len(load_rows(data_sources(cfg.data, "train"))[0]) == 24
    assert len(load_rows(data_sources(cfg.data, "eval"))[0]) == 8
    with pytest.raises(ValueError, match="no split 'validation'"):
        data_sources(load_config(None, **tiny_overrides(local, tmp_path, train_split="validation")).data, "train")


def test_hh_style_file_converts_and_trains(local, tmp_path):
    hh = tmp_path / "hh.jsonl"
    rows = [dict(chosen=f"\n\nHuman: how do i fix the bike ?\n\nAssistant: first get the bike ready , then fix the bike {i} .",
                 rejected="\n\nHuman: how do i fix the bike ?\n\nAssistant: sorry , i can not help with that .",
                 chosen_safe=bool(i % 2), rejected_safe=True) for i in range(8)]
    hh.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.jsonl"
    res = subprocess.run([sys.executable, str(ROOT / "recipes" / "convert_hh.py"), str(hh), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    converted, skipped = load_rows([str(out)])
    assert len(converted) == 8 and skipped == 0
    assert converted[0]["prompt"] == "Human: how do i fix the bike ?"
    assert converted[0]["safer_response_id"] == 1 and converted[1]["safer_response_id"] == 0


def test_classifier_judge_generation_report(local, tmp_path):
    """safedpo eval --generate with judge=classifier:<dir>: samples judged in batches, every sample in
    the JSONL, and the harmless ratio with a Wilson interval, consistent with the scores."""
    test_prompts = tmp_path / "prompts.jsonl"
    items = [json.loads(line) for line in open(local["paths"]["test_prompts"])][:6]
    test_prompts.write_text("".join(json.dumps(dict(prompt=i["prompt"])) + "\n" for i in items))
    samples = tmp_path / "samples.jsonl"
    overrides = [f"model={local['model']}", f"train_dataset={local['data']}", f"output_dir={tmp_path}",
                 f"judge=classifier:{local['judge']}", f"generation_prompts={test_prompts}", "generation_samples=2",
                 "max_new_tokens=4", "progress=false", "device=cpu", "max_length=48", "max_prompt_length=24",
                 "checkpoint=base"]
    res = subprocess.run([sys.executable, "-m", "safedpo", "eval", "--generate", *overrides, f"samples_file={samples}"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == 12 and report["judged"] == 12
    scores = [x["score"] for x in lines]
    assert all(s == s for s in scores)
    assert report["harmless_ratio"] == sum(s <= 0.5 for s in scores) / 12
    low, high = report["harmless_ci95"]
    assert 0 <= low <= report["harmless_ratio"] <= high <= 1
    # A threshold at the median splits the samples: the verdicts follow the threshold.
    median = sorted(scores)[6]
    res = subprocess.run([sys.executable, "-m", "safedpo", "eval", "--generate", *overrides, f"judge_threshold={median}",
                          f"samples_file={samples}"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert json.loads(res.stdout)["harmless_ratio"] == sum(s <= median for s in scores) / 12


def test_eval_needs_a_checkpoint_and_reads_training_checkpoints(local, tmp_path):
    """safedpo eval without checkpoint= is an error naming the choices; a training checkpoint
    (checkpoints/step-N) evaluates as the saved model of the same step does."""
    from safedpo.evaluate import evaluate_checkpoint
    from safedpo.train import train

    overrides = tiny_overrides(local, tmp_path / "run", max_steps=2)
    train(load_config(None, **overrides))
    res = subprocess.run([sys.executable, "-m", "safedpo", "eval", *[f"{k}={v}" for k, v in overrides.items()]],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 2 and "checkpoint=<run>/final" in res.stderr and "checkpoint=base" in res.stderr
    cfg = load_config(None, **overrides)
    final = evaluate_checkpoint(cfg, str(tmp_path / "run" / "final"))
    step = evaluate_checkpoint(cfg, str(tmp_path / "run" / "checkpoints" / "step-2"))
    base = evaluate_checkpoint(cfg, "base")
    for key in ("eval_loss", "eval_reward_accuracy", "eval_margin"):
        assert abs(final[key] - step[key]) <= 1e-6, key
    assert base["eval_margin"] == 0.0 and final["eval_margin"] != 0.0  # the base model is its own reference


def test_generate_checks_the_judge_before_sampling(local, tmp_path, monkeypatch):
    from safedpo import evaluate

    def never(*a, **k):
        raise AssertionError("sampled before the judge was checked")

    monkeypatch.setattr(evaluate, "sample_responses", never)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(dict(prompt="how do i fix the bike ?")) + "\n")
    cfg = load_config(None, **tiny_overrides(local, tmp_path / "run", generation_prompts=str(prompts), judge="keyword"))
    with pytest.raises(ValueError, match="keyword is the toy task's judge"):
        evaluate.generation_report(cfg, "base")


def test_a_missing_model_directory_is_named_as_the_model(local, tmp_path):
    from safedpo.train import train

    cfg = load_config(None, **{**tiny_overrides(local, tmp_path / "run"), "model": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match=r"^model '.*nope': no such local directory"):
        train(cfg)
