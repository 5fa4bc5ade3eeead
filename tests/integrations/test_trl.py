"""Drop-in use from other trainers: TRL's DPOTrainer with SafeDPO (SafeDPOTrainer), and the examples
(a TRL run, a plain transformers loop, padding-free packed batches), each on a tiny local model."""

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[2]


COMMON = dict(beta=0.1, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, report_to="none",
              save_strategy="no", use_cpu=True, seed=0, logging_steps=1, max_length=64, dataloader_num_workers=0)


def our_trainer(stand_ins, tmp_path, make_model=None, peft_config=None, **safedpo_args):
    """A SafeDPOTrainer on a tiny model (``make_model()``, default the stand-in Llama) and the stand-in data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safedpo_kernels.integrations.trl import SafeDPOConfig, SafeDPOTrainer, pku_to_preference

    make_model = make_model or (lambda: AutoModelForCausalLM.from_pretrained(stand_ins["model"]))
    data = pku_to_preference(datasets.load_from_disk(stand_ins["data"])["train"])
    tok = AutoTokenizer.from_pretrained(stand_ins["model"])
    return SafeDPOTrainer(model=make_model(), processing_class=tok, peft_config=peft_config,
                          args=SafeDPOConfig(output_dir=str(tmp_path / "ours"), **COMMON, **safedpo_args),
                          train_dataset=data)


def trainer_pair(stand_ins, tmp_path, make_model=None, peft_config=None, shared=None, **safedpo_args):
    """A SafeDPOTrainer and TRL's own DPOTrainer on identical copies of a tiny model (``make_model()``,
    default the stand-in Llama) and the same data; ``shared``: DPOConfig arguments of both. (Accelerate's
    state is per process: the trainer built last decides, e.g., whether models prepared from then on are
    compiled.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from safedpo_kernels.integrations.trl import pku_to_preference

    shared = shared or {}
    ours = our_trainer(stand_ins, tmp_path, make_model, peft_config, **shared, **safedpo_args)
    make_model = make_model or (lambda: AutoModelForCausalLM.from_pretrained(stand_ins["model"]))
    data = pku_to_preference(datasets.load_from_disk(stand_ins["data"])["train"])
    tok = AutoTokenizer.from_pretrained(stand_ins["model"])
    trl = DPOTrainer(model=make_model(), processing_class=tok, peft_config=peft_config,
                     args=DPOConfig(output_dir=str(tmp_path / "trl"), **COMMON, **shared), train_dataset=data)
    return ours, trl


def tiny(stand_ins, where, config_name: str, **extra):
    """A loader of one tiny random model of a transformers config class with the stand-ins' vocabulary,
    saved under ``where`` (TRL builds its reference model from the policy's path)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoConfig.from_pretrained(stand_ins["model"])
    config = getattr(transformers, config_name)(
        vocab_size=base.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=base.pad_token_id,
        eos_token_id=base.eos_token_id, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(where)
    return lambda: AutoModelForCausalLM.from_pretrained(where)


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), grads


def assert_same_as_trl(ours, trl, label="", tol=1e-5):
    """One batch through both trainers: the same loss and gradients (TRL's batch has no safety flags)."""
    batch = next(iter(ours.get_train_dataloader()))
    trl_batch = {k: v for k, v in batch.items() if k not in ("chosen_safe", "rejected_safe")}
    assert "chosen_safe" in batch and batch["chosen_safe"].dtype == torch.bool  # the flags survived TRL's pipeline
    a_loss, a_grads = loss_and_grads(ours, batch)
    b_loss, b_grads = loss_and_grads(trl, trl_batch)
    assert abs(a_loss.item() - b_loss.item()) <= tol * max(1.0, abs(b_loss.item())), (a_loss, b_loss)
    assert a_grads.shape == b_grads.shape
    assert (a_grads - b_grads).abs().max() <= tol * b_grads.abs().max()
    # DPOTrainer's token metrics, which ours take from the kernels' own pass
    assert ours._metrics["train"]["num_tokens"] == trl._metrics["train"]["num_tokens"]
    for name in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):
        mine, theirs = ours._metrics["train"][name][-1], trl._metrics["train"][name][-1]
        assert abs(mine - theirs) <= 1e-5 * max(1.0, abs(theirs)), (name, mine, theirs)
    print(f"TRL {__import__('trl').__version__} {label}: |dloss| = {abs(a_loss.item() - b_loss.item()):.2e}, "
          f"max |dgrad| = {(a_grads - b_grads).abs().max().item():.2e} (max |grad| {b_grads.abs().max().item():.2e})")


def perturbed(model, scale=0.05):
    """The model's weights moved by seeded noise, the same for identical copies."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


PLAIN_DPO = dict(delta=0.0, swap=False, drop_both_unsafe=False)


@pytest.mark.parametrize("loss_input", ["logits", "linear"])
def test_plain_dpo_equals_trls_own_loss(stand_ins, tmp_path, loss_input):
    """delta = 0, T off: the same loss and gradients as TRL's DPOTrainer on the same batch."""
    ours, trl = trainer_pair(stand_ins, tmp_path, **PLAIN_DPO, fused_loss_input=loss_input)
    assert_same_as_trl(ours, trl, loss_input)


@pytest.mark.parametrize("loss_input", ["logits", "linear"])
@pytest.mark.parametrize("arch", ["mixtral", "cohere"])
def test_real_architectures_equal_trls_own_loss(stand_ins, tmp_path, arch, loss_input):
    """A mixture-of-experts model (TRL adds the router's load-balancing loss; so must we, on both paths,
    and log it) and a model that scales its logits (which the fused-linear path must apply)."""
    extra = dict(mixtral=("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5,
                                                 output_router_logits=True)),
                 cohere=("CohereConfig", dict(logit_scale=4.0)))[arch]
    ours, trl = trainer_pair(stand_ins, tmp_path, tiny(stand_ins, tmp_path / arch, extra[0], **extra[1]), **PLAIN_DPO,
                             fused_loss_input=loss_input)
    assert_same_as_trl(ours, trl, f"{arch} {loss_input}")
    if arch == "mixtral":
        assert ours.aux_loss_enabled and ours._metrics["train"]["aux_loss"] == trl._metrics["train"]["aux_loss"]


@pytest.mark.parametrize("arch, loss_input", [("llama", "logits"), ("llama", "linear"), ("cohere", "linear")])
def test_loss_lists_with_an_sft_term_equal_trls_own_loss(stand_ins, tmp_path, arch, loss_input):
    """TRL's loss mixing: loss_type ["sigmoid", "sft"] with loss_weights [1, w] (its RPO-style SFT term, one
    token mean over the chosen responses) gives TRL's loss and gradients, within 1e-6 relative, float32,
    one micro-batch on one process; and the trainer logs each term."""
    make_model = None if arch == "llama" else tiny(stand_ins, tmp_path / arch, "CohereConfig", logit_scale=4.0)
    shared = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7])
    ours, trl = trainer_pair(stand_ins, tmp_path, make_model, shared=shared, **PLAIN_DPO, fused_loss_input=loss_input)
    assert ours.args.loss_options().terms == ("sigmoid", "sft")
    assert_same_as_trl(ours, trl, f"sigmoid+sft {arch} {loss_input}", tol=1e-6)
    logged = ours._metrics["train"]
    assert set(logged) >= {"loss/sigmoid", "loss/sft"} and logged["loss/sft"][-1] > 0


def test_padding_free_packs_each_batch_and_equals_padding(stand_ins, tmp_path):
    """padding_free=True: every batch goes through the model as one packed row (position ids restart per
    sequence, cu_seqlens; transformers' packed SDPA here, flash-attention's varlen path on a GPU with it);
    the loss and gradients equal the padded batch's, with a loss list and with the fused-linear path."""
    from transformers import AutoModelForCausalLM

    from safedpo_kernels.integrations.trl import pack_batch

    args = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3], delta=2.0)
    for loss_input in ("logits", "linear"):
        padded = our_trainer(stand_ins, tmp_path / f"padded-{loss_input}", fused_loss_input=loss_input, **args)
        packed = our_trainer(stand_ins, tmp_path / f"packed-{loss_input}", fused_loss_input=loss_input,
                             padding_free=True, **args)
        assert packed.pack and packed.args.padding_free and not padded.pack
        batch = next(iter(padded.get_train_dataloader()))
        a_loss, a_grads = loss_and_grads(padded, batch)
        b_loss, b_grads = loss_and_grads(packed, batch)
        assert abs(a_loss.item() - b_loss.item()) <= 1e-5 * max(1.0, abs(a_loss.item()))
        assert (a_grads - b_grads).abs().max() <= 1e-5 * a_grads.abs().max()
    kwargs, labels, cu = pack_batch(batch)
    lengths = batch["attention_mask"].sum(-1)
    assert kwargs["input_ids"].shape == (1, int(lengths.sum())) and cu.tolist()[-1] == int(lengths.sum())
    assert kwargs["position_ids"][0, : int(lengths[0])].tolist() == list(range(int(lengths[0])))
    assert int((labels != -100).sum()) == int(batch["completion_mask"][:, 1:].sum())
    model = AutoModelForCausalLM.from_pretrained(stand_ins["model"])
    with torch.no_grad():  # the packed row's logits are each sequence's own
        whole = model(**kwargs, use_cache=False).logits[0]
        first = model(input_ids=batch["input_ids"][1:2, : int(lengths[1])]).logits[0]
    assert (whole[int(cu[1]):int(cu[2])] - first).abs().max() <= 1e-4


@pytest.mark.parametrize("shared, loss_input", [
    (dict(loss_type=["hinge"]), "logits"), (dict(loss_type=["ipo"]), "linear"),
    (dict(loss_type=["robust"], label_smoothing=0.2), "logits"), (dict(loss_type=["robust"], label_smoothing=0.2), "linear"),
    (dict(loss_type=["hinge", "sft"], loss_weights=[0.5, 2.0]), "linear"),
])
def test_the_other_pair_losses_equal_trls_own(stand_ins, tmp_path, shared, loss_input):
    """hinge, ipo (TRL's token-averaged log-ratios), robust with its eps, and a weighted list: TRL's loss
    and gradients on the same batch."""
    ours, trl = trainer_pair(stand_ins, tmp_path, shared=shared, **PLAIN_DPO, fused_loss_input=loss_input)
    for trainer in (ours, trl):  # away from policy == reference, where every pair loss is flat in eps
        perturbed(trainer.model)
    assert_same_as_trl(ours, trl, f"{shared} {loss_input}")


@pytest.mark.parametrize("loss_input", ["logits", "linear"])
def test_evaluate_logs_dpotrainers_metrics(stand_ins, tmp_path, loss_input):
    """Trainer.evaluate() on a held-out set: every eval metric DPOTrainer logs, with its value."""
    from safedpo_kernels.integrations.trl import pku_to_preference

    held_out = pku_to_preference(datasets.load_from_disk(stand_ins["data"])["train"]).select(range(8))
    ours, trl = trainer_pair(stand_ins, tmp_path, **PLAIN_DPO, fused_loss_input=loss_input)
    for trainer, rows in ((ours, held_out), (trl, held_out.remove_columns(["chosen_safe", "rejected_safe"]))):
        perturbed(trainer.model)
        trainer.eval_dataset = trainer._prepare_dataset(rows, trainer.processing_class, trainer.args, "eval")
    mine, theirs = ours.evaluate(), trl.evaluate()
    timing = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
    for name, value in theirs.items():
        if name.startswith("eval_") and name not in timing:
            assert abs(mine[name] - value) <= 1e-5 * max(1.0, abs(value)), (name, mine[name], value)
    assert mine["eval_safedpo/kept_pairs"] == 1.0


def test_two_processes_log_what_dpotrainer_logs(stand_ins, tmp_path):
    """Under torchrun with two processes (DDP on gloo): the losses and every metric DPOTrainer logs, each
    gathered over the processes its way (means over pairs, token sums for entropy, logits and token
    accuracy), at both steps."""
    stdout = run_example(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(Path(__file__).with_name("trl_two_processes.py")), str(stand_ins["model"]),
                          str(stand_ins["data"]), str(tmp_path)], timeout=600)
    logs = json.loads(next(line for line in stdout.splitlines() if line.startswith("LOGS "))[5:])
    assert len(logs["trl"]) == len(logs["ours"]) == 2
    for mine, theirs in zip(logs["ours"], logs["trl"]):
        for name, value in theirs.items():
            assert abs(mine[name] - value) <= 1e-4 * max(1.0, abs(value)), (name, mine[name], value)
    assert logs["ours"][1]["rewards/accuracies"] > 0  # the second step's pairs have moved apart


def test_label_smoothing_on_sigmoid_is_conservative_dpo_and_warned(stand_ins, tmp_path):
    """SPEC's "sigmoid" with eps is conservative DPO; TRL 1.16's DPOTrainer ignores label_smoothing for its
    "sigmoid" loss. SafeDPOTrainer trains SPEC's loss and says, when built, that TRL's differs."""
    from safedpo_kernels import safedpo_loss_from_logps, sequence_logps
    from safedpo_kernels.labels import labels_from_completion_mask

    with pytest.warns(UserWarning, match="label_smoothing=0.3 with loss_type 'sigmoid'.*TRL 1.16's DPOTrainer"):
        ours, trl = trainer_pair(stand_ins, tmp_path, shared=dict(label_smoothing=0.3), **PLAIN_DPO)
    for trainer in (ours, trl):
        perturbed(trainer.model)
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    labels = labels_from_completion_mask(batch["input_ids"], batch["completion_mask"])
    with torch.no_grad():
        policy, ref = (sequence_logps(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)
                       for m in (ours.model, ours.ref_model))
        mine = ours.compute_loss(ours.model, batch).item()
        theirs = trl.compute_loss(trl.model, {k: v for k, v in batch.items() if "safe" not in k}).item()
    want = {eps: safedpo_loss_from_logps(policy, ref, batch["chosen_safe"], batch["rejected_safe"], beta=0.1,
                                         label_smoothing=eps, **PLAIN_DPO).loss.item() for eps in (0.3, 0.0)}
    assert abs(want[0.3] - want[0.0]) > 1e-3  # the batch tells the two losses apart
    assert abs(mine - want[0.3]) <= 1e-5 and abs(theirs - want[0.0]) <= 1e-5, (mine, theirs, want)


def test_a_list_mixing_ipo_is_refused_with_the_reason(stand_ins, tmp_path):
    from safedpo_kernels.integrations.trl import SafeDPOConfig

    with pytest.raises(ValueError, match="mixing 'ipo' with another term"):
        SafeDPOConfig(output_dir=str(tmp_path), loss_type=["ipo", "sft"], report_to="none", use_cpu=True).loss_options()
    with pytest.raises(ValueError, match=r"supports loss_type names .*\['kto'\]"):
        SafeDPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "kto"], report_to="none", use_cpu=True).loss_options()
    assert SafeDPOConfig(output_dir=str(tmp_path), loss_type=["ipo"], report_to="none", use_cpu=True).loss_options().average


@pytest.mark.parametrize("adapter,loss_input", [("new", "logits"), ("pretrained", "logits"), ("pretrained", "linear")])
def test_lora_reference_is_trls(stand_ins, tmp_path, adapter, loss_input):
    """LoRA without a ref_model: the reference is the policy with its adapters disabled (a new adapter)
    or TRL's frozen "ref" copy of a pretrained adapter -- not the base model, which differs from it."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")

    def trained(model):  # as after some training: the adapters no longer do nothing
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        return model

    def with_adapter():
        torch.manual_seed(0)  # lora_A's initialization
        return trained(peft.get_peft_model(AutoModelForCausalLM.from_pretrained(stand_ins["model"]), config))

    if adapter == "new":
        ours, trl = trainer_pair(stand_ins, tmp_path, peft_config=config, **PLAIN_DPO, fused_loss_input=loss_input)
        trained(ours.model), trained(trl.model)
    else:
        ours, trl = trainer_pair(stand_ins, tmp_path, with_adapter, **PLAIN_DPO, fused_loss_input=loss_input)
        assert "ref" in ours.model.peft_config
    assert_same_as_trl(ours, trl, f"LoRA {adapter} {loss_input}")


def test_linear_path_refuses_an_unknown_logit_transform(stand_ins, tmp_path):
    """A model whose logits are not its LM head (with the transform its config names) is an error on
    the fused-linear path, naming the model and the setting to use instead, before any training; never
    wrong log-probs."""
    from transformers import AutoModelForCausalLM

    def doubled():
        model = AutoModelForCausalLM.from_pretrained(stand_ins["model"])

        class DoubledLogits(type(model)):
            def forward(self, *args, **kwargs):
                out = super().forward(*args, **kwargs)
                out.logits = out.logits * 2.0
                return out

        model.__class__ = DoubledLogits
        return model

    with pytest.raises(ValueError, match="DoubledLogits.*fused_loss_input='logits'"):  # when the trainer is built
        our_trainer(stand_ins, tmp_path, doubled, fused_loss_input="linear")


@pytest.mark.parametrize("loss_input", ["logits", "linear"])
def test_safedpo_trains_and_logs_its_metrics(stand_ins, tmp_path, loss_input):
    """With delta and T on the loss is SafeDPO's on the batch's flags; two steps train (under TRL's
    default bf16 autocast) and log kept and swapped pairs."""
    from safedpo_kernels import safedpo_loss_from_logps, sequence_logps
    from safedpo_kernels.labels import labels_from_completion_mask

    ours, _ = trainer_pair(stand_ins, tmp_path, delta=2.0, fused_loss_input=loss_input)
    assert ours.args.bf16
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


@pytest.mark.parametrize("loss_input", ["logits", "linear"])
def test_trls_torch_compile_trains_the_same(stand_ins, tmp_path, loss_input):
    """TRL's torch_compile=True (accelerate compiles the policy; with "linear" the fused-linear loss runs
    inside its compiled forward): two steps log the eager run's losses, with no graph break. aot_eager
    traces as inductor does, without code."""
    runs = {}
    for compiled in (False, True):
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        ours = our_trainer(stand_ins, tmp_path / str(compiled), delta=2.0, fused_loss_input=loss_input, **extra)
        torch._dynamo.utils.counters.clear()
        ours.train()
        runs[compiled] = [h["loss"] for h in ours.state.log_history if "loss" in h]
        # the policy itself ran compiled (not only the reference model)
        assert (type(ours.model_wrapped).__name__ == "OptimizedModule") == compiled
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
        torch._dynamo.reset()
    assert len(runs[True]) == 2 and max(abs(a - b) for a, b in zip(runs[True], runs[False])) <= 1e-4, runs


@pytest.mark.parametrize("ref_input", ["logits", "linear"])
def test_a_synced_reference_trains_as_trls(stand_ins, tmp_path, ref_input):
    """sync_ref_model=True (TR-DPO: TRL's callback mixes the policy into the reference model every
    ref_model_sync_steps): our reference log-probs come from the synced model, so both steps log TRL's
    losses; a reference frozen by mistake would part from them at step 2."""
    shared = dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    ours, trl = trainer_pair(stand_ins, tmp_path, shared=shared, **PLAIN_DPO, ref_fused_loss_input=ref_input)
    logged = []
    for trainer in (ours, trl):
        trainer.train()
        logged.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    # Adam's first steps are near sign updates, so float32 rounding differences of the two trainers'
    # gradients show in step 2's loss: 2e-5 to 5e-5 without the sync, up to 1.1e-4 with it; the sync
    # itself moves step 2's loss by about 1.5e-2.
    assert len(logged[0]) == 2 and max(abs(a - b) for a, b in zip(*logged)) <= 5e-4, logged
    frozen = our_trainer(stand_ins, tmp_path / "frozen", **PLAIN_DPO, ref_fused_loss_input=ref_input)
    frozen.train()
    unsynced = [h["loss"] for h in frozen.state.log_history if "loss" in h]
    assert abs(unsynced[1] - logged[0][1]) > 5e-3, (unsynced, logged[0])  # the sync matters here


def test_pku_rows_are_read_strictly():
    """Flags written as strings mean what they say (bool("false") would be True), in every spelling the
    trainer's loader accepts; anything else names the row and the column."""
    from safedpo_kernels.integrations.trl import pku_to_preference

    def rows(flag0, flag1, better):
        return datasets.Dataset.from_list([dict(prompt="p", response_0="a", response_1="b", is_response_0_safe=flag0,
                                                is_response_1_safe=flag1, better_response_id=better)] * 2)

    for flag0, flag1, better in [("false", "True", "1"), ("no", "YES", "1"), (0, 1, 1.0), (False, True, 1)]:
        out = pku_to_preference(rows(flag0, flag1, better))[0]
        assert (out["chosen"], out["chosen_safe"], out["rejected_safe"]) == ("b", True, False)
    out = pku_to_preference(rows("0", "1", "0"))[0]
    assert (out["chosen"], out["chosen_safe"], out["rejected_safe"]) == ("a", False, True)
    with pytest.raises(ValueError, match="row 1, column 'is_response_0_safe'.*'maybe'"):
        pku_to_preference(rows("maybe", "true", "1"))
    with pytest.raises(ValueError, match="row 1, column 'better_response_id'"):
        pku_to_preference(rows("false", "true", "2"))


def test_unsupported_options_and_missing_flags(stand_ins, tmp_path):
    from safedpo_kernels.integrations.trl import SafeDPOConfig, SafeDPOTrainer, SafetyPreferenceCollator

    with pytest.raises(ValueError, match="loss_type"):
        SafeDPOTrainer(model=stand_ins["model"], args=SafeDPOConfig(output_dir=str(tmp_path), loss_type="kto",
                                                                     report_to="none", use_cpu=True),
                       train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    collator = SafetyPreferenceCollator(pad_token_id=0)
    with pytest.raises(KeyError, match="chosen_safe"):
        collator([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}])
    example = {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "chosen_safe": "false", "rejected_safe": 1}
    batch = collator([example])
    assert batch["chosen_safe"].tolist() == [False] and batch["rejected_safe"].tolist() == [True]
    with pytest.raises(ValueError, match="chosen_safe.*'unsafe'"):
        collator([{**example, "chosen_safe": "unsafe"}])



def test_a_dataset_without_preference_columns_is_named(stand_ins, tmp_path):
    """Forgetting pku_to_preference, or a renamed column: one clear error before TRL's preparation (which
    fails with a bare KeyError 'chosen' or 'prompt')."""
    from safedpo_kernels.integrations.trl import SafeDPOConfig, SafeDPOTrainer

    args = SafeDPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    pku = datasets.load_from_disk(stand_ins["data"])["train"]
    with pytest.raises(ValueError, match=r"train_dataset: missing column\(s\) \['chosen', 'rejected', 'chosen_safe', "
                                         r"'rejected_safe'\].*convert them with pku_to_preference"):
        SafeDPOTrainer(model=stand_ins["model"], args=args, train_dataset=pku)
    renamed = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c", "chosen_is_safe": True,
                                           "rejected_safe": False}])
    with pytest.raises(ValueError, match=r"eval_dataset: missing column\(s\) \['chosen_safe'\]"):
        SafeDPOTrainer(stand_ins["model"], None, args, None, renamed.rename_column("chosen_is_safe", "chosen_safe"),
                       renamed)
    with_images = renamed.rename_column("chosen_is_safe", "chosen_safe").add_column("images", [[]])
    with pytest.raises(ValueError, match="train_dataset: column 'images': .*vision-language preference data"):
        SafeDPOTrainer(model=stand_ins["model"], args=args, train_dataset=with_images)


def test_a_collator_that_drops_the_flags_is_named(stand_ins, tmp_path):
    """A custom data_collator without the safety flags: a KeyError saying what the batch lacks and what
    passes them on, not a bare KeyError from inside the loss."""
    from transformers import AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from safedpo_kernels.integrations.trl import SafeDPOConfig, SafeDPOTrainer, pku_to_preference

    tok = AutoTokenizer.from_pretrained(stand_ins["model"])
    ours = SafeDPOTrainer(model=stand_ins["model"], processing_class=tok,
                          args=SafeDPOConfig(output_dir=str(tmp_path), **COMMON),
                          data_collator=DataCollatorForPreference(pad_token_id=tok.pad_token_id),
                          train_dataset=pku_to_preference(datasets.load_from_disk(stand_ins["data"])["train"]))
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    with pytest.raises(KeyError, match=r"no \['chosen_safe', 'rejected_safe'\]: a custom data_collator.*SafetyPreference"):
        ours.compute_loss(ours.model, batch)


def run_example(args, timeout=900):
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


WORDS = {True: ("true", "yes", "1", "True"), False: ("false", "no", "0", "FALSE")}


def zero_margin_loss(rows, delta=10.0):
    """The first step's SafeDPO loss, worked out from the flags alone: at step 1 the policy is its own
    reference, so u = -delta * s with s = 1 for a (safe, unsafe) pair and for a swapped (unsafe, safe)
    one, 0 for (safe, safe); (unsafe, unsafe) is dropped."""
    losses = []
    for r in rows:
        w = int(r["better_response_id"])
        chosen, rejected = (r[f"is_response_{k}_safe"] in WORDS[True] for k in (w, 1 - w))
        if not chosen and not rejected:
            continue
        s = 0.0 if chosen and rejected else 1.0
        losses.append(math.log1p(math.exp(delta * s)))
    return sum(losses) / len(losses)


def test_loop_examples_read_string_flags_and_keep_a_frozen_reference(stand_ins, tmp_path):
    """Both loop examples on rows whose safety flags are strings ("false", "no", "0" are unsafe): the
    first step's loss is the one worked out from the flags, and later steps (the reference frozen at the
    initial policy, not the current one) agree between the logits example and the packed fused-linear one."""
    rows = [json.loads(line) for line in open(stand_ins["train_jsonl"])][:12]
    for i, r in enumerate(rows):
        for k in (0, 1):
            r[f"is_response_{k}_safe"] = WORDS[bool(r[f"is_response_{k}_safe"])][(i + k) % 4]
    data = tmp_path / "strings.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for example in ("hf_loop.py", "packed_flash_attn.py"):
        out = run_example([f"examples/{example}", "--model", stand_ins["model"], "--data", str(data), "--steps", "3",
                           "--pairs", "4", "--lr", "1e-3"])
        losses[example] = [json.loads(line)["loss"] for line in out.splitlines() if line.startswith("{")]
    want = zero_margin_loss(rows[:4])
    for got in losses.values():
        assert len(got) == 3 and abs(got[0] - want) <= 1e-5, (got, want)
        # A reference recomputed from the trained policy would keep every later step at its zero-margin value.
        assert abs(got[1] - zero_margin_loss(rows[4:8])) > 1e-3
    # Padded logits and packed hidden states compute the same losses; Adam's first, sign-like step turns
    # their float32 differences into small ones in the weights.
    assert max(abs(a - b) for a, b in zip(*losses.values())) <= 1e-2, losses


def test_trl_example_runs(stand_ins, tmp_path):
    out = run_example(["examples/trl_safedpo.py", "--model", stand_ins["model"], "--dataset", stand_ins["train_jsonl"],
                       "--steps", "2", "--output-dir", str(tmp_path)])
    assert "'loss'" in out or "train_loss" in out


def test_a_non_finite_training_loss_is_refused_with_the_batch(stand_ins, tmp_path):
    """A policy whose weights went NaN: the first training batch's loss is not finite, and SafeDPOTrainer
    stops with the step and the batch's log-probs before any update (TRL's Trainer would apply it, only
    keeping the NaN out of its logged loss)."""
    from transformers import AutoModelForCausalLM

    def diverged():
        model = AutoModelForCausalLM.from_pretrained(stand_ins["model"])
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")
        return model

    ours = our_trainer(stand_ins, tmp_path, make_model=diverged, delta=2.0)
    with pytest.raises(FloatingPointError, match=r"the training loss at step 1 is not finite on 1 of 1 processes; "
                                                 r"this process's 4 pairs have chosen log-probs \[nan"):
        ours.train()
    assert ours.state.global_step == 0


@pytest.mark.parametrize("setup", ["ref_model", "packed", "lora"])
def test_the_linear_reference_equals_the_logits_reference_without_the_logits(stand_ins, tmp_path, setup):
    """ref_fused_loss_input="linear": the reference's log-probs from its hidden states and head equal those
    from its logits and float64's (float32; a reference model, padded or packed; a LoRA policy's frozen
    "ref" adapter), the (2B, T, V) logits are never allocated, and under bf16 mixed precision it runs in
    the autocast the model's own forward has; any other value is refused by name."""
    from transformers import AutoModelForCausalLM

    from bench.memory import profiled_peak_bytes
    from safedpo_kernels.integrations.trl import labels_from_completion_mask

    extra = dict(padding_free=True) if setup == "packed" else {}
    make_model = None
    if setup == "lora":
        peft = pytest.importorskip("peft")

        def make_model():
            torch.manual_seed(0)
            model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(stand_ins["model"]),
                                        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
            gen = torch.Generator().manual_seed(3)
            with torch.no_grad():  # adapters that change the model: the "ref" copy is then not the base model
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            return model

    def reference_logps(ref, bf16=False):
        t = our_trainer(stand_ins, tmp_path / f"{ref}-{bf16}", make_model, ref_fused_loss_input=ref, bf16=bf16, **extra)
        model = t.ref_model if t.ref_model is not None else t.model
        assert setup != "lora" or "ref" in t.model.peft_config
        return t, model, t._ref_logps(model, t._prepare_inputs(batch), autocast=False)

    batch = next(iter(our_trainer(stand_ins, tmp_path / "data", bf16=False).get_train_dataloader()))
    t, model, linear = reference_logps("linear")
    _, _, logits = reference_logps("logits")
    assert linear.shape == (batch["input_ids"].shape[0],)
    assert torch.allclose(linear, logits, rtol=1e-5, atol=1e-5), (linear, logits)
    if setup == "ref_model":  # float64's, from the saved model
        m = AutoModelForCausalLM.from_pretrained(stand_ins["model"]).double()
        labels = labels_from_completion_mask(batch["input_ids"], batch["completion_mask"])
        with torch.no_grad():
            z = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
        want = (z.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)).sum(-1)
        assert torch.allclose(linear.double(), want, rtol=1e-5, atol=1e-5), (linear, want)
        bf16_linear = reference_logps("linear", bf16=True)[2]
        bf16_logits = reference_logps("logits", bf16=True)[2]
        assert not torch.allclose(bf16_linear, linear, rtol=1e-5, atol=1e-5)  # autocast did apply
        assert torch.allclose(bf16_linear, bf16_logits, rtol=2e-2), (bf16_linear, bf16_logits)
        # Memory, on a copy of the model whose vocabulary (padded to 16384) makes the logits the largest
        # tensor: the logits path holds all of them, the linear path the response rows' (in chunks).
        big = m.config.to_dict() | dict(vocab_size=16384, torch_dtype="float32")
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(type(m.config).from_dict(big)).save_pretrained(tmp_path / "big")
        make_model = lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "big")  # noqa: E731
        peaks = {}
        for ref in ("linear", "logits"):
            tr, mo, _ = reference_logps(ref)
            inputs = tr._prepare_inputs(batch)
            peaks[ref] = profiled_peak_bytes(functools.partial(tr._ref_logps, mo, inputs, autocast=False))
        logits_bytes = batch["input_ids"].numel() * 16384 * 4
        assert peaks["linear"] < 0.75 * logits_bytes <= peaks["logits"], (peaks, logits_bytes)
    with pytest.raises(ValueError, match="ref_fused_loss_input must be 'logits' or 'linear', got 'hidden'"):
        our_trainer(stand_ins, tmp_path / "bad", ref_fused_loss_input="hidden")
    from safedpo_kernels.integrations.trl import SafeDPOConfig, SafeDPOTrainer

    def config(**kw):
        return SafeDPOConfig(output_dir=str(tmp_path / "cfg"), report_to="none", use_cpu=True, **kw)

    for sharded in (dict(fsdp=True, deepspeed=False), dict(fsdp=False, deepspeed=True)):
        with pytest.raises(ValueError, match="ref_fused_loss_input='linear' is not supported with (FSDP|DeepSpeed)"):
            SafeDPOTrainer._check_reference_path(config(ref_fused_loss_input="linear"), **sharded)
        SafeDPOTrainer._check_reference_path(config(), **sharded)  # the logits reference goes through the wrapper
        SafeDPOTrainer._check_reference_path(config(ref_fused_loss_input="linear", precompute_ref_log_probs=True),
                                             **sharded)  # computed before the model is wrapped
