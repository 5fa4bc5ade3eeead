"""Loss mixing in our trainer (loss_type lists, loss_weights): one step's loss and gradient are the
global-batch formula however the batch is split over micro-batches and ranks, each term is logged, and a
checkpoint written with a single name resumes under the one-element list."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from tiny_runs import config, losses, torchrun  # noqa: E402

MIX = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])


def test_micro_batches_add_up_to_the_global_batch(task, tmp_path):
    """train_step on one batch of 6 pairs and on the same pairs as micro-batches of 2 and 4 (uneven: the
    "sft" term's token divisor differs from any one micro-batch's): the same loss, terms, gradients and
    token metrics (TRL's entropy, logits/chosen, logits/rejected, mean_token_accuracy), equal to the
    float64 oracle on the whole batch."""
    from safedpo.collate import make_batch
    from safedpo.data import data_sources, load_examples
    from safedpo.distributed import Dist
    from safedpo.model import PairScorer, build_model, load_tokenizer
    from safedpo.train import train_step
    from safedpo_kernels import reference

    cfg = config(task, tmp_path / "unused", **MIX)
    tok = load_tokenizer(task["tokenizer"])
    examples, _ = load_examples(cfg.data, tok, data_sources(cfg.data, "train"), 0)
    model = build_model(cfg.model, len(tok), torch.device("cpu"), seed=3)
    policy = PairScorer(model, "logits", backend="torch", token_stats=True)
    options = cfg.loss_options()
    procs = Dist("cpu")
    indices = list(range(6))

    def zero_reference(batch):
        return torch.zeros(batch["input_ids"].shape[0])

    def step(splits):
        model.zero_grad()
        micro = [make_batch(examples, part, tok.pad_token_id, False, torch.device("cpu")) for part in splits]
        stats = train_step(policy, zero_reference, micro, options, procs)
        return stats, torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    whole, g_whole = step([indices])
    split, g_split = step([indices[:2], indices[2:]])
    assert abs(whole["loss"] - split["loss"]) <= 1e-6 * max(1.0, abs(whole["loss"]))
    for name in ("sigmoid", "sft"):
        assert abs(whole[f"loss/{name}"] - split[f"loss/{name}"]) <= 1e-6
    assert abs(whole["loss/sigmoid"] + whole["loss/sft"] - whole["loss"]) <= 1e-6
    assert ((g_whole - g_split).norm() / g_whole.norm()).item() <= 1e-5
    batch = make_batch(examples, indices, tok.pad_token_id, False, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    want = reference.safedpo_loss(logits, batch["labels"], None, batch["chosen_safe"], batch["rejected_safe"],
                                  **options.as_dict())
    assert abs(whole["loss"] - want.loss.item()) <= 1e-5 * max(1.0, abs(want.loss.item()))
    entropy, mean_logit, top1, tokens = reference.token_stats(logits, batch["labels"])
    expected = {"entropy": entropy.sum() / tokens.sum(), "logits/chosen": mean_logit[:6].sum() / tokens[:6].sum(),
                "logits/rejected": mean_logit[6:].sum() / tokens[6:].sum(),
                "mean_token_accuracy": top1[:6].sum() / tokens[:6].sum()}
    for name, value in expected.items():
        assert abs(whole[name] - float(value)) <= 1e-5 * max(1.0, abs(float(value))), name
        assert abs(split[name] - whole[name]) <= 1e-6 * max(1.0, abs(whole[name])), name


def test_each_term_is_logged_and_a_single_name_resumes_as_a_list(task, tmp_path):
    from safedpo.config import normalized
    from safedpo.run_dir import config_changes
    from safedpo.train import train

    train(config(task, tmp_path / "mixed", max_steps=2, eval_every=2, **MIX))
    records = [json.loads(line) for line in open(tmp_path / "mixed" / "metrics.jsonl")]
    steps = [r for r in records if "event" not in r]
    for r in steps:
        assert abs(r["loss/sigmoid"] + r["loss/sft"] - r["loss"]) <= 1e-6 and r["loss/sft"] > 0
        assert r["entropy"] > 0 and 0.0 <= r["mean_token_accuracy"] <= 1.0 and "logits/chosen" in r
    assert abs(steps[-1]["eval_loss/sigmoid"] + steps[-1]["eval_loss/sft"] - steps[-1]["eval_loss"]) <= 1e-6
    start = next(r for r in records if r.get("event") == "start")
    assert start["config"]["loss_type"] == ["sigmoid", "sft"] and start["config"]["loss_weights"] == [1.0, 0.5]
    # A checkpoint of an earlier version says loss_type: sigmoid; this one's config says ["sigmoid"].
    now = dict(config(task, tmp_path / "x").flat(), world_size=1)
    saved = dict(now, loss_type="sigmoid")
    assert config_changes(normalized(saved), now) == []
    assert config_changes(normalized(dict(saved, loss_type=["sigmoid", "sft"])), now) == [
        "loss_type: ['sigmoid', 'sft'] -> ['sigmoid']"]
    assert config_changes(normalized(dict(saved, loss_weights=[0.5])), now) == ["loss_weights: [0.5] -> []"]


@pytest.mark.xdist_group("processes")
def test_two_ranks_match_one_with_a_mixed_loss(task, tmp_path):
    """2 ranks x 2 pairs (gloo) versus 1 rank x 4 pairs with an "sft" term: the token divisor is the
    global batch's on both ranks, so the losses agree."""
    from safedpo.train import train

    train(config(task, tmp_path / "one", max_steps=3, batch_size=4, **MIX))
    torchrun(config(task, tmp_path / "two", max_steps=3, batch_size=2, **MIX))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5
