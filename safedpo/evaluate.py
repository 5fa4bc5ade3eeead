"""Evaluation: held-out pair metrics (during training and of a saved model) and a generation-based
harmless ratio.

- ``evaluate_pairs(policy, reference, examples, ...)``: loss, reward accuracy, margin and safe-over-unsafe
  accuracy (on pairs with one safe and one unsafe response: how often the implicit reward
  beta * (logp - ref_logp) ranks the safe one higher).
- ``evaluate_checkpoint(cfg, path)``: the same for the model saved at ``path`` against the configured
  model as the reference.
- ``sample_responses(model, tokenizer, prompts, sampling)``: the one sampler, and ``judged_report`` of a
  judge's verdicts (safedpo.judge): the harmless ratio on harmful prompts and the helpfulness on benign
  ones. The toy's measurement and ``safedpo eval --generate`` both go through them.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple

import torch

from safedpo_kernels import loss_denominators
from safedpo_kernels.options import LossOptions

from .collate import make_batch
from .data import data_sources, encode_prompt, load_examples
from .model import PairScorer, build_model, check_token_ids


def reward_stats(out) -> tuple:
    """(pairs whose chosen reward beats the rejected one, summed reward margin), over the kept pairs."""
    correct = int(((out.chosen_rewards > out.rejected_rewards) & out.kept).sum())
    margin = float(((out.chosen_rewards - out.rejected_rewards) * out.kept).sum())
    return correct, margin


@torch.no_grad()
def evaluate_pairs(policy: PairScorer, reference, examples, options: LossOptions, batch_size: int, pad_id: int,
                   packed: bool, device) -> dict:
    """Held-out loss (``options``' loss and reduction over the kept pairs), reward accuracy, safe-over-unsafe
    accuracy and mean margin (see the module docstring), through the same forward as training,
    ``batch_size`` pairs at a time."""
    per_batch = options.replace(reduction="sum")
    totals = dict(kept=0, tokens=0, correct=0, margin=0.0, mixed=0, safe_wins=0)
    term_sums = [0.0] * len(options.terms)
    policy.eval()
    for s in range(0, len(examples), batch_size):
        idx = list(range(s, min(s + batch_size, len(examples))))
        batch = make_batch(examples, idx, pad_id, packed, device)
        out = policy(batch, loss=per_batch, ref_logps=reference(batch, "eval")).result
        term_sums = [a + float(t) for a, t in zip(term_sums, out.loss_terms)]
        totals["kept"] += int(out.kept.sum())
        totals["tokens"] += int(loss_denominators(batch["token_counts"], batch["chosen_safe"], batch["rejected_safe"],
                                                  options)[1])
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
    if options.reduction == "mean":  # each term over the whole set's divisor: its kept pairs, or their tokens
        term_sums = [t / (totals["tokens"] if name == "sft" else totals["kept"]) if t else 0.0
                     for name, t in zip(options.terms, term_sums)]
    terms = {f"eval_loss/{name}": t for name, t in zip(options.terms, term_sums)} if len(term_sums) > 1 else {}
    return dict(
        eval_loss=sum(term_sums),
        **terms,
        eval_reward_accuracy=totals["correct"] / kept,
        eval_margin=totals["margin"] / kept,
        eval_safe_over_unsafe=totals["safe_wins"] / max(totals["mixed"], 1),
        eval_pairs=len(examples),
    )


BASE = "base"
CHECKPOINT_HELP = ("checkpoint=<run>/final (a saved model), checkpoint=<run>/checkpoints/step-N (a training "
                   "checkpoint), or checkpoint=base (the configured model, untrained)")


def trained_model(cfg, vocab_size: int, device, checkpoint: str):
    """The model ``checkpoint`` names: ``base`` (the config's model, untrained), a saved model directory (a
    run's final/, or a Hub id), or a training checkpoint (checkpoints/step-N: state.pt + meta.json,
    restored into the config's model, with its LoRA adapters when it has them)."""
    from .checkpoint import restore_model
    from .model import apply_lora

    if not checkpoint:
        raise ValueError(f"say which model to evaluate: {CHECKPOINT_HELP}")
    if checkpoint == BASE:
        return build_model(cfg.model, vocab_size, device, seed=cfg.optim.seed)
    path = Path(checkpoint)
    if (path / "meta.json").is_file():
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("sharded"):
            raise ValueError(f"{path} holds shards (fsdp or tensor_parallel), which only a run on {meta.get('world')} ranks "
                             "reads; evaluate the run's final/ instead")
        model = build_model(cfg.model, vocab_size, device, seed=cfg.optim.seed)
        if cfg.model.lora:
            model = apply_lora(model, cfg.model.lora)
        restore_model(model, torch.load(path / "state.pt", weights_only=True, map_location="cpu")["model"])
        return model
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"checkpoint={checkpoint!r} is neither a saved model (no config.json) nor a training "
                         f"checkpoint (no meta.json); use {CHECKPOINT_HELP}")
    return build_model(cfg.model, vocab_size, device, path=checkpoint)


def evaluate_checkpoint(cfg, checkpoint: Optional[str] = None) -> dict:
    """Held-out pair metrics of the model ``checkpoint`` names (see ``trained_model``) against cfg's
    reference (the configured model), on cfg's evaluation data."""
    from .distributed import Dist
    from .model import config_tokenizer, quiet_libraries
    from .ref_logps import ReferenceLogps

    quiet_libraries()
    cfg.validate()
    sources = data_sources(cfg.data, "eval")
    if not sources:
        raise ValueError("no evaluation data: set eval_files, or train_dataset with eval_split")
    if not checkpoint:
        raise ValueError(f"say which model to evaluate: {CHECKPOINT_HELP}")
    procs = Dist(cfg.run.device)
    try:  # under torchrun Dist starts a process group: it ends here (Dist.close)
        tok = config_tokenizer(cfg.model, checkpoint)
        examples, _ = load_examples(cfg.data, tok, sources, cfg.optim.seed)
        # the reference: the policy before training
        initial = build_model(cfg.model, len(tok), procs.device, seed=cfg.optim.seed)
        trained = trained_model(cfg, len(tok), procs.device, checkpoint)
        check_token_ids(trained, "the tokenizer", evaluation=examples)
        loss = cfg.loss
        policy = PairScorer(trained, loss.loss_input, loss.average_logps, loss.backend)
        initial_policy = PairScorer(initial, loss.loss_input, loss.average_logps, loss.backend)
        reference = ReferenceLogps(dataclasses.replace(loss, reference="live"), initial_policy, {}, tok, procs, False, None)
        metrics = evaluate_pairs(policy, reference, examples, cfg.loss_options(), cfg.optim.batch_size, tok.pad_token_id,
                                 False, procs.device)
        return dict(metrics, checkpoint=checkpoint)
    finally:
        procs.close()


class Sampling(NamedTuple):
    """How responses are sampled: ``samples`` per prompt, up to ``max_new_tokens`` each, at
    ``temperature`` (0: greedy), from ``seed``; prompts cut to ``max_prompt_length`` tokens (from the
    left, as in training), ``batch_size`` prompts per forward."""

    samples: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    seed: int = 0
    max_prompt_length: int = 128
    batch_size: int = 16


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: List[str], sampling: Sampling, progress: bool = False) -> List[str]:
    """``sampling.samples`` responses per prompt, in prompt-major order, decoded without special tokens.

    The one sampler of the package (the toy's measurement and ``safedpo eval --generate``): a KV-cached
    decoding loop whose draws come from a CPU generator seeded by (seed, sample index), so that the same
    model, prompts and seed give the same responses on any device, up to the rounding of the
    probabilities."""
    from .progress import Progress

    model.eval()
    per_sample = []
    with Progress(len(prompts) * sampling.samples, "sampling", disable=not progress) as bar:
        for s in range(sampling.samples):
            gen = torch.Generator(device="cpu").manual_seed(sampling.seed * 1000 + s)
            responses = []
            for b0 in range(0, len(prompts), sampling.batch_size):
                batch = prompts[b0:b0 + sampling.batch_size]
                responses += _sample_batch(model, tokenizer, batch, sampling, gen)
                bar.update(len(batch))
            per_sample.append(responses)
    return [per_sample[s][i] for i in range(len(prompts)) for s in range(sampling.samples)]


def _sample_batch(model, tokenizer, prompts: List[str], sampling: Sampling, gen: torch.Generator) -> List[str]:
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    encoded = [encode_prompt(tokenizer, p, sampling.max_prompt_length) for p in prompts]
    # Left padding, so that every row's next token is at the last position.
    L = max(len(e) for e in encoded)
    ids = torch.tensor([[pad] * (L - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in encoded], device=device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    done = torch.zeros(len(encoded), dtype=torch.bool, device=device)
    out, past = [], None
    cache = _cache_keyword(model)
    for _ in range(sampling.max_new_tokens):
        step = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **{cache: past})
        past, logits = getattr(step, cache), step.logits[:, -1].float()
        if sampling.temperature > 0:
            probs = torch.softmax(logits / sampling.temperature, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(device)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out.append(nxt)
        done |= nxt == eos
        if bool(done.all()):
            break
        # A finished row's padding is masked out (its end-of-sequence token, the step it ends, is not).
        mask = torch.cat([mask, (~done | (nxt == eos)).long()[:, None]], 1)
        ids, position_ids = nxt[:, None], (mask.sum(-1, keepdim=True) - 1).clamp(min=0)
    responses = []
    for row in torch.stack(out, 1).tolist():
        row = row[: row.index(eos)] if eos in row else row
        responses.append(tokenizer.decode([t for t in row if t != pad], skip_special_tokens=True))
    return responses


def _cache_keyword(model) -> str:
    """The name of the KV cache in the model's forward and output: transformers 5.2x calls it ``cache``,
    earlier releases ``past_key_values`` (a LoRA model's own forward takes anything: its base model says)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def judged_report(items: List[dict], responses: List[str], judge) -> Tuple[dict, List[dict]]:
    """(report, verdicts) of sampled responses (``items[i]`` the prompt item of ``responses[i]``) by a judge
    of safedpo.judge: the harmless ratio (the share judged safe) with its 95% Wilson interval over the
    items marked harmful (every item when none carries "harmful"), and the helpfulness of the others when
    the judge rates it."""
    from .judge import wilson_interval

    verdicts = judge(items, responses)
    harmful = [v for item, v in zip(items, verdicts) if item.get("harmful", True)]
    safe = sum(not v["unsafe"] for v in harmful)
    low, high = wilson_interval(safe, len(harmful))
    report = dict(harmless_ratio=safe / max(len(harmful), 1), harmless_ci95=[low, high], judged=len(harmful))
    rated = [v["helpful"] for item, v in zip(items, verdicts) if not item.get("harmful", True) and v.get("helpful") is not None]
    if rated:
        report["helpfulness"] = sum(rated) / len(rated)
    return report, verdicts


def prompt_items(cfg) -> List[dict]:
    """The prompts of a sampled evaluation: generation_prompts (a jsonl of {"prompt": ...}, extra
    fields kept for the judge), else the distinct prompts of the evaluation data, in order."""
    from .data import load_rows

    prompts = cfg.eval.generation_prompts
    if prompts:
        items = []
        for n, line in enumerate(Path(prompts).read_text().splitlines()):
            if line.strip():
                item = json.loads(line)
                if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                    raise ValueError(f"{prompts}, line {n + 1}: expected an object with a 'prompt' string")
                items.append(item)
        return items
    sources = data_sources(cfg.data, "eval")
    if not sources:
        raise ValueError("no prompts: set generation_prompts, eval_files, or train_dataset with eval_split")
    rows, _ = load_rows(sources, cfg.data.columns, cfg.data.skip_bad_rows)
    return [dict(prompt=p) for p in dict.fromkeys(r["prompt"] for r in rows)]


def generation_report(cfg, checkpoint: Optional[str] = None, samples_file: Optional[str] = None) -> dict:
    """``safedpo eval --generate``: sample responses to the evaluation prompts, judge them (the eval
    section's judge), write every sample with its verdict to a JSONL file, and report the harmless ratio
    (see ``judged_report``)."""
    from .distributed import Dist
    from .judge import make_judge
    from .model import config_tokenizer, quiet_libraries

    quiet_libraries()
    cfg.validate()
    procs = Dist(cfg.run.device)
    try:  # under torchrun Dist starts a process group: it ends here (Dist.close)
        items = prompt_items(cfg)
        ev = cfg.eval
        rows = [item for item in items for _ in range(ev.generation_samples)]
        judge = make_judge(ev.judge, ev.judge_threshold, procs.device, cfg.run.progress)
        judge.check(rows)  # before sampling, not after
        tok = config_tokenizer(cfg.model, checkpoint)
        model = trained_model(cfg, len(tok), procs.device, checkpoint)
        sampling = Sampling(ev.generation_samples, ev.max_new_tokens, ev.temperature, cfg.optim.seed,
                            cfg.data.max_prompt_length)
        responses = sample_responses(model, tok, [i["prompt"] for i in items], sampling, progress=cfg.run.progress)
        report, verdicts = judged_report(rows, responses, judge)
        path = Path(samples_file or Path(cfg.run.output_dir) / "generation_samples.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for item, response, verdict in zip(rows, responses, verdicts):
                f.write(json.dumps(dict(prompt=item["prompt"], response=response, **verdict)) + "\n")
        return dict(report, judge=ev.judge, samples_file=str(path))
    finally:
        procs.close()
