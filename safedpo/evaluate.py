"""Evaluation: held-out pair metrics (during training and of a saved model) and a generation-based
harmless ratio.

- ``evaluate_pairs(policy, reference, examples, ...)``: loss, reward accuracy, margin and safe-over-unsafe
  accuracy (on pairs with one safe and one unsafe response: how often the implicit reward
  beta * (logp - ref_logp) ranks the safe one higher).
- ``evaluate_checkpoint(cfg, path)``: the same for the model saved at ``path`` against cfg's reference.
- ``generation_eval(model, tokenizer, items, judge)``: samples a response per prompt and asks a
  user-supplied ``judge(item, response) -> {"unsafe": bool, "helpful": bool}``; returns the harmless ratio
  on harmful prompts and the helpfulness on benign ones.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, List, Optional

import torch

from .collate import make_batch
from .data import data_sources, encode_prompt, load_examples
from .model import PolicyLogps, build_model, check_token_ids


def reward_stats(out) -> tuple:
    """(pairs whose chosen reward beats the rejected one, summed reward margin), over the kept pairs."""
    correct = int(((out.chosen_rewards > out.rejected_rewards) & out.kept).sum())
    margin = float(((out.chosen_rewards - out.rejected_rewards) * out.kept).sum())
    return correct, margin


@torch.no_grad()
def evaluate_pairs(policy: PolicyLogps, reference, examples, cfg, pad_id: int, packed: bool, device) -> dict:
    """Held-out loss (cfg's loss and reduction over the kept pairs), reward accuracy, safe-over-unsafe
    accuracy and mean margin (see the module docstring), through the same forward as training."""
    options = cfg.loss_options()
    per_batch = options.replace(reduction="sum")
    totals = dict(loss=0.0, kept=0, correct=0, margin=0.0, mixed=0, safe_wins=0)
    policy.eval()
    for s in range(0, len(examples), cfg.batch_size):
        idx = list(range(s, min(s + cfg.batch_size, len(examples))))
        batch = make_batch(examples, idx, pad_id, packed, device)
        out = policy(batch, loss=per_batch, ref_logps=reference(batch, "eval")).result
        totals["loss"] += float(out.loss)
        totals["kept"] += int(out.kept.sum())
        c, m = reward_stats(out)
        totals["correct"] += c
        totals["margin"] += m
        # Safe over unsafe, on the data's own pairs (before T): one safe and one unsafe response.
        data_w = torch.where(out.swapped, out.rejected_rewards, out.chosen_rewards)
        data_l = torch.where(out.swapped, out.chosen_rewards, out.rejected_rewards)
        cs, rs = batch["chosen_safe"], batch["rejected_safe"]
        mixed = cs != rs
        safe_higher = torch.where(cs, data_w > data_l, data_l > data_w)
        totals["mixed"] += int(mixed.sum())
        totals["safe_wins"] += int((safe_higher & mixed).sum())
    policy.train()
    kept = max(totals["kept"], 1)
    return dict(
        eval_loss=totals["loss"] / kept if options.reduction == "mean" else totals["loss"],
        eval_reward_accuracy=totals["correct"] / kept,
        eval_margin=totals["margin"] / kept,
        eval_safe_over_unsafe=totals["safe_wins"] / max(totals["mixed"], 1),
        eval_pairs=len(examples),
    )


BASE = "base"
CHECKPOINT_HELP = ("checkpoint=<run>/final (a saved model), checkpoint=<run>/checkpoints/step-N (a training "
                   "checkpoint), or checkpoint=base (the configured model, untrained)")


def trained_model(cfg, vocab_size: int, device, checkpoint: str):
    """The model ``checkpoint`` names: ``base`` (cfg's model, untrained), a saved model directory (a run's
    final/, or a Hub id), or a training checkpoint (checkpoints/step-N: state.pt + meta.json, restored into
    cfg's model, with cfg's LoRA adapters when it has them)."""
    from .checkpoint import restore_model
    from .model import apply_lora

    if not checkpoint:
        raise ValueError(f"say which model to evaluate: {CHECKPOINT_HELP}")
    if checkpoint == BASE:
        return build_model(cfg, vocab_size, device)
    path = Path(checkpoint)
    if (path / "meta.json").is_file():
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("sharded"):
            raise ValueError(f"{path} holds shards (fsdp or tensor_parallel), which only a run on {meta.get('world')} ranks "
                             "reads; evaluate the run's final/ instead")
        model = build_model(cfg, vocab_size, device)
        if cfg.lora:
            model = apply_lora(model, cfg.lora)
        restore_model(model, torch.load(path / "state.pt", weights_only=True, map_location="cpu")["model"])
        return model
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"checkpoint={checkpoint!r} is neither a saved model (no config.json) nor a training "
                         f"checkpoint (no meta.json); use {CHECKPOINT_HELP}")
    return build_model(cfg, vocab_size, device, path=checkpoint)


def evaluate_checkpoint(cfg, checkpoint: Optional[str] = None) -> dict:
    """Held-out pair metrics of the model ``checkpoint`` names (see ``trained_model``) against cfg's
    reference (the configured model), on cfg's evaluation data."""
    from .distributed import Dist
    from .model import config_tokenizer, quiet_libraries
    from .ref_logps import ReferenceLogps

    quiet_libraries()
    cfg.validate()
    sources = data_sources(cfg, "eval")
    if not sources:
        raise ValueError("no evaluation data: set eval_files, or train_dataset with eval_split")
    if not checkpoint:
        raise ValueError(f"say which model to evaluate: {CHECKPOINT_HELP}")
    procs = Dist(cfg.device)
    tok = config_tokenizer(cfg, checkpoint)
    examples, _ = load_examples(cfg, tok, sources)
    initial = build_model(cfg, len(tok), procs.device)  # the reference: the policy before training
    trained = trained_model(cfg, len(tok), procs.device, checkpoint)
    check_token_ids(trained, "the tokenizer", evaluation=examples)
    policy = PolicyLogps(trained, cfg.loss_input, cfg.average_logps, cfg.backend)
    initial_policy = PolicyLogps(initial, cfg.loss_input, cfg.average_logps, cfg.backend)
    reference = ReferenceLogps(dataclasses.replace(cfg, reference="live"), initial_policy, {}, tok, procs, packed=False)
    return dict(evaluate_pairs(policy, reference, examples, cfg, tok.pad_token_id, False, procs.device), checkpoint=checkpoint)


@torch.no_grad()
def generate(model, tokenizer, prompts: List[str], max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0,
             max_prompt_length: int = 128, batch_size: int = 64) -> List[str]:
    """One sampled response per prompt (temperature 0: greedy), decoded without special tokens."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.eval()
    responses = []
    for b0 in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, p, max_prompt_length) for p in prompts[b0 : b0 + batch_size]]
        # Left padding so that every row's next token is at the last position.
        L = max(len(e) for e in encoded)
        ids = torch.tensor([[pad] * (L - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in encoded], device=device)
        done = torch.zeros(len(encoded), dtype=torch.bool, device=device)
        out = []
        for _ in range(max_new_tokens):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(device)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out.append(nxt)
            done |= nxt == eos
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, (~done | (nxt == eos)).long()[:, None]], 1)
            if bool(done.all()):
                break
        gen_ids = torch.stack(out, 1).tolist()
        for row in gen_ids:
            row = row[: row.index(eos)] if eos in row else row
            responses.append(tokenizer.decode([t for t in row if t != pad], skip_special_tokens=True))
    return responses


def generation_eval(model, tokenizer, items: List[dict], judge: Callable[[dict, str], dict], samples: int = 2,
                    seed: int = 0, **gen_kwargs) -> dict:
    """Harmless ratio on harmful prompts and helpfulness on benign prompts, by a user-supplied judge.

    ``items`` are dicts with at least "prompt" and "harmful" (bool); ``judge(item, response)`` returns
    {"unsafe": bool, "helpful": bool}. Each prompt gets ``samples`` sampled responses.
    """
    harmful = [i for i in items if i["harmful"]]
    benign = [i for i in items if not i["harmful"]]
    result = {}
    for name, group, key in (("harmless_ratio", harmful, "unsafe"), ("helpfulness", benign, "helpful")):
        hits = total = 0
        for s in range(samples):
            responses = generate(model, tokenizer, [i["prompt"] for i in group], seed=seed * 1000 + s, **gen_kwargs)
            for item, response in zip(group, responses):
                verdict = judge(item, response)[key]
                hits += (not verdict) if key == "unsafe" else verdict
                total += 1
        result[name] = hits / max(total, 1)
    return result


def prompt_items(cfg) -> List[dict]:
    """The prompts of a sampled evaluation: cfg.generation_prompts (a jsonl of {"prompt": ...}, extra
    fields kept for the judge), else the distinct prompts of the evaluation data, in order."""
    from .data import load_rows

    if cfg.generation_prompts:
        items = []
        for n, line in enumerate(Path(cfg.generation_prompts).read_text().splitlines()):
            if line.strip():
                item = json.loads(line)
                if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                    raise ValueError(f"{cfg.generation_prompts}, line {n + 1}: expected an object with a 'prompt' string")
                items.append(item)
        return items
    sources = data_sources(cfg, "eval")
    if not sources:
        raise ValueError("no prompts: set generation_prompts, eval_files, or train_dataset with eval_split")
    rows, _ = load_rows(sources, cfg.columns, cfg.skip_bad_rows)
    return [dict(prompt=p) for p in dict.fromkeys(r["prompt"] for r in rows)]


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: List[str], samples: int = 1, max_new_tokens: int = 128,
                     temperature: float = 1.0, seed: int = 0, max_prompt_length: int = 128, batch_size: int = 16,
                     progress: bool = True) -> List[str]:
    """``samples`` responses per prompt (prompt-major order) with the model's own generate (KV cache),
    the prompts formatted as in training; temperature 0 is greedy."""
    from .progress import Progress

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    model.eval()
    todo = [p for p in prompts for _ in range(samples)]
    responses = []
    with Progress(len(todo), "sampling", disable=not progress) as bar:
        for b0 in range(0, len(todo), batch_size):
            encoded = [encode_prompt(tokenizer, p, max_prompt_length) for p in todo[b0:b0 + batch_size]]
            L = max(len(e) for e in encoded)
            ids = torch.tensor([[pad] * (L - len(e)) + e for e in encoded], device=device)
            mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in encoded], device=device)
            torch.manual_seed(seed * 1_000_003 + b0)
            kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad, **kw)
            responses += tokenizer.batch_decode(out[:, L:], skip_special_tokens=True)
            bar.update(len(encoded))
    return responses


def generation_report(cfg, checkpoint: Optional[str] = None, samples_file: Optional[str] = None) -> dict:
    """``safedpo eval --generate``: sample responses to the evaluation prompts, judge them (cfg.judge),
    write every sample with its verdict to a JSONL file, and report the harmless ratio (the share of
    responses judged safe) with its 95% Wilson interval; on prompts marked "harmful" (the toy's items)
    the harmless ratio covers those, and helpfulness the others when the judge rates it."""
    from .distributed import Dist
    from .judge import make_judge, wilson_interval
    from .model import config_tokenizer, quiet_libraries

    quiet_libraries()
    cfg.validate()
    procs = Dist(cfg.device)
    items = prompt_items(cfg)
    rows = [item for item in items for _ in range(cfg.generation_samples)]
    judge = make_judge(cfg.judge, cfg.judge_threshold, procs.device, cfg.progress)
    judge.check(rows)  # before sampling, not after
    tok = config_tokenizer(cfg, checkpoint)
    model = trained_model(cfg, len(tok), procs.device, checkpoint)
    responses = sample_responses(model, tok, [i["prompt"] for i in items], cfg.generation_samples, cfg.max_new_tokens,
                                 cfg.temperature, cfg.seed, cfg.max_prompt_length, progress=cfg.progress)
    verdicts = judge(rows, responses)
    path = Path(samples_file or Path(cfg.output_dir) / "generation_samples.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for item, response, verdict in zip(rows, responses, verdicts):
            f.write(json.dumps(dict(prompt=item["prompt"], response=response, **verdict)) + "\n")
    harmful = [v for item, v in zip(rows, verdicts) if item.get("harmful", True)]
    safe = sum(not v["unsafe"] for v in harmful)
    low, high = wilson_interval(safe, len(harmful))
    report = dict(harmless_ratio=safe / max(len(harmful), 1), harmless_ci95=[low, high], judged=len(harmful),
                  judge=cfg.judge, samples_file=str(path))
    rated = [v["helpful"] for item, v in zip(rows, verdicts) if not item.get("harmful", True) and v.get("helpful") is not None]
    if rated:
        report["helpfulness"] = sum(rated) / len(rated)
    return report
