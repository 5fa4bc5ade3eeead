"""Drop-in use from other trainers: TRL's DPOTrainer with SafeDPO (SafeDPOTrainer), and the examples
(a TRL run, a plain transformers loop, padding-free packed batches), each on a tiny local model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parent.parent


def trainer_pair(stand_ins, tmp_path, **safedpo_args):
    """A SafeDPOTrainer and TRL's own DPOTrainer on identical copies of the tiny model and the same data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from safedpo_kernels.integrations.trl import SafeDPOConfig, SafeDPOTrainer, pku_to_preference

    data = pku_to_preference(datasets.load_from_disk(stand_ins["data"])["train"])
    common = dict(beta=0.1, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, report_to="none",
                  save_strategy="no", use_cpu=True, seed=0, logging_steps=1, max_length=64, dataloader_num_workers=0)
    tok = AutoTokenizer.from_pretrained(stand_ins["model"])
    ours = SafeDPOTrainer(model=AutoModelForCausalLM.from_pretrained(stand_ins["model"]), processing_class=tok,
                          args=SafeDPOConfig(output_dir=str(tmp_path / "ours"), **common, **safedpo_args),
                          train_dataset=data)
    trl = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(stand_ins["model"]), processing_class=tok,
                     args=DPOConfig(output_dir=str(tmp_path / "trl"), **common), train_dataset=data)
    return ours, trl


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), grads


@pytest.mark.parametrize("loss_input", ["logits", "linear"])
def test_plain_dpo_equals_trls_own_loss(stand_ins, tmp_path, loss_input):
    """delta = 0, T off: the same loss and gradients as TRL's DPOTrainer on the same batch."""
    ours, trl = trainer_pair(stand_ins, tmp_path, delta=0.0, swap=False, drop_both_unsafe=False,
                             fused_loss_input=loss_input)
    batch = next(iter(ours.get_train_dataloader()))
    trl_batch = {k: v for k, v in batch.items() if k not in ("chosen_safe", "rejected_safe")}
    assert "chosen_safe" in batch and batch["chosen_safe"].dtype == torch.bool  # the flags survived TRL's pipeline
    a_loss, a_grads = loss_and_grads(ours, batch)
    b_loss, b_grads = loss_and_grads(trl, trl_batch)
    assert abs(a_loss.item() - b_loss.item()) <= 1e-5 * max(1.0, abs(b_loss.item())), (a_loss, b_loss)
    assert (a_grads - b_grads).abs().max() <= 1e-5 * b_grads.abs().max()
    print(f"TRL {__import__('trl').__version__} {loss_input}: |dloss| = {abs(a_loss.item() - b_loss.item()):.2e}, "
          f"max |dgrad| = {(a_grads - b_grads).abs().max().item():.2e} (max |grad| {b_grads.abs().max().item():.2e})")


def test_safedpo_trains_and_logs_its_metrics(stand_ins, tmp_path):
    """With delta and T on the loss is SafeDPO's on the batch's flags; two steps train and log kept and
    swapped pairs."""
    from safedpo_kernels import safedpo_loss_from_logps, sequence_logps
    from safedpo_kernels.labels import labels_from_completion_mask

    ours, _ = trainer_pair(stand_ins, tmp_path, delta=2.0)
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    loss = ours.compute_loss(ours.model, batch)
    labels = labels_from_completion_mask(batch["input_ids"], batch["completion_mask"])
    with torch.no_grad():
        policy = sequence_logps(ours.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)
        ref = sequence_logps(ours.ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)
    want = safedpo_loss_from_logps(policy, ref, batch["chosen_safe"], batch["rejected_safe"], beta=0.1, delta=2.0)
    assert abs(loss.item() - want.loss.item()) <= 1e-5
    ours.train()
    logged = [h for h in ours.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(h["loss"] == h["loss"] for h in logged)
    assert {"safedpo/kept_pairs", "safedpo/swapped_pairs", "rewards/accuracies"} <= set(logged[0])


def test_unsupported_options_and_missing_flags(stand_ins, tmp_path):
    from safedpo_kernels.integrations.trl import SafeDPOConfig, SafeDPOTrainer, SafetyPreferenceCollator

    with pytest.raises(ValueError, match="loss_type"):
        SafeDPOTrainer(model=stand_ins["model"], args=SafeDPOConfig(output_dir=str(tmp_path), loss_type="kto",
                                                                     report_to="none", use_cpu=True),
                       train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    collator = SafetyPreferenceCollator(pad_token_id=0)
    with pytest.raises(KeyError, match="chosen_safe"):
        collator([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}])


def run_example(args, timeout=900):
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.parametrize("example", ["hf_loop.py", "packed_flash_attn.py"])
def test_loop_examples_run(stand_ins, example):
    out = run_example([f"examples/{example}", "--model", stand_ins["model"], "--data", stand_ins["train_jsonl"],
                       "--steps", "2", "--lr", "1e-3"])
    steps = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [s["step"] for s in steps] == [1, 2] and all(s["loss"] == s["loss"] for s in steps)


def test_trl_example_runs(stand_ins, tmp_path):
    out = run_example(["examples/trl_safedpo.py", "--model", stand_ins["model"], "--dataset", stand_ins["train_jsonl"],
                       "--steps", "2", "--output-dir", str(tmp_path)])
    assert "'loss'" in out or "train_loss" in out
