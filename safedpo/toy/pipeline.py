"""The toy pipeline: task files -> SFT -> preference training -> generation-based evaluation.

``make train`` runs ``safedpo experiment default --seeds 0,1,2``: for each seed SFT then SafeDPO, ending
with a table (mean and spread over the seeds, and each seed) of the SFT and SafeDPO models' harmless ratio
(harmful test prompts answered without unsafe content) and helpfulness (benign test prompts walked
through). ``safedpo experiment NAME`` runs the paper's
comparisons over seeds and writes a markdown table (mean and spread) and a PNG plot under runs/.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch

from . import make_task, vocabulary
from .tokenizer import build_tokenizer

# Four layers with tied input/output embeddings, as in small real LMs. With two layers and untied output
# embeddings, preference training pushed the rejected openings down and the freed probability went to
# words no response starts with (most often the prompt's own harmful verb), then to rambling.
TOY_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
# Preference-training settings of the toy runs. The toy's responses have about 15 tokens, so their
# sequence log-ratios are an order of magnitude smaller than the paper's (hundreds of tokens, beta 0.1,
# delta 10). At beta 0.1 the margin delta / beta asked for 20 nats: the loss never saturated, pushed the
# rejected responses' probability far down, and the freed probability went to rambling (likelihood
# displacement), differently for every seed and CPU rounding (harmless 0.70 or helpfulness 0.33 on some).
# beta 1.0 with delta 2 asks for 2 nats and regularizes towards the SFT model as strongly as the paper's
# setting does for long responses; 280 steps at lr 7e-5. Chosen on seeds 0-4 of one AVX-512 machine
# and as AVX2 and plain x86-64 machines (160 steps left AVX2's seed 3 at 0.922 harmless), checked on held-out
# seeds 5-7 on all three (safedpo.toy.robustness; docs/toy/robustness.md).
PREF = dict(beta=1.0, delta=2.0, lr=7e-5, batch_size=32, max_steps=280, warmup_steps=10, max_prompt_length=32, max_length=64)
SFT = dict(steps=400, batch_size=32, lr=3e-3)

EXPERIMENTS = {
    "default": [("SafeDPO", dict(mode="safedpo"))],
    "baselines": [
        ("DPO-HELPFUL", dict(mode="dpo-helpful")),
        ("DPO-HARMLESS", dict(mode="dpo-harmless")),
        ("DPO-SAFEBETTER", dict(mode="dpo-safebetter")),
        ("SafeDPO", dict(mode="safedpo")),
    ],
    "delta-sweep": [(f"delta={d:g}", dict(mode="safedpo", delta=float(d))) for d in (0, 2, 5, 10, 20)],
    "noswap": [("SafeDPO", dict(mode="safedpo")), ("NoSwap", dict(mode="noswap"))],
    "label-noise": [(f"noise={p:g}", dict(mode="safedpo", safety_label_noise=p)) for p in (0.0, 0.1, 0.2)],
    # An SFT term on the kept pairs' preferred responses against the likelihood displacement of a large
    # margin: weight 0 is SafeDPO alone (the same run as delta-sweep's).
    "sft-weight": [(f"delta={d:g} sft={w:g}", dict(mode="safedpo", delta=float(d), loss_type=["sigmoid", "sft"],
                                                   loss_weights=[1.0, w]))
                   for d in (10, 20) for w in (0.0, 0.05, 0.2, 1.0)],
}


def write_task(out: str | Path, seed: int = 0) -> Dict[str, Path]:
    """Data files (PKU-SafeRLHF columns), SFT data, test prompts and the tokenizer, under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = make_task(seed)
    paths = {}
    for name in ("train", "test", "sft", "test_prompts"):
        paths[name] = out / f"{name}.jsonl"
        with open(paths[name], "w") as f:
            for row in task[name]:
                f.write(json.dumps(row) + "\n")
    paths["tokenizer"] = out / "tokenizer"
    build_tokenizer(vocabulary(), paths["tokenizer"])
    return paths


def _read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in open(path)]


def train_sft(paths: Dict[str, Path], out_dir: Path, seed: int, steps: int, progress: bool = True) -> Path:
    """Supervised fine-tuning of a tiny Llama on the SFT responses (response-token NLL, fused kernel)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safedpo_kernels import sequence_logps

    from ..collate import pad_sequences
    from ..data import encode_prompt
    from ..model import load_tokenizer
    from ..progress import progress as iterate

    tok = load_tokenizer(str(paths["tokenizer"]))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), attn_implementation="sdpa", **TOY_MODEL))
    rows = _read_jsonl(paths["sft"])
    seqs = []
    for r in rows:
        p = encode_prompt(tok, r["prompt"], PREF["max_prompt_length"])
        seqs.append((p + tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id], len(p)))
    opt = torch.optim.AdamW(model.parameters(), lr=SFT["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in iterate(range(steps), "SFT", disable=not progress):
        idx = torch.randint(0, len(seqs), (SFT["batch_size"],), generator=g).tolist()
        batch = pad_sequences([seqs[i] for i in idx], tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = sequence_logps(logits, batch["labels"], inplace_backward=True)
        loss = -logps.sum() / (batch["labels"] != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def generation_metrics(model_dir: Path, paths: Dict[str, Path], seed: int, samples: int = 4) -> dict:
    """Harmless ratio and helpfulness of the model in ``model_dir`` on the test prompts, through the same
    sampler and judge as ``safedpo eval --generate judge=keyword``."""
    from transformers import AutoModelForCausalLM

    from ..evaluate import Sampling, judged_report, sample_responses
    from ..judge import KeywordJudge
    from ..model import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    items = _read_jsonl(paths["test_prompts"])
    sampling = Sampling(samples=samples, max_new_tokens=40, seed=seed, batch_size=64)
    responses = sample_responses(model, tok, [i["prompt"] for i in items], sampling)
    report, _ = judged_report([i for i in items for _ in range(samples)], responses, KeywordJudge())
    return dict(harmless_ratio=report["harmless_ratio"], helpfulness=report["helpfulness"])


def preference_run(paths, sft_dir: Path, out_dir: Path, seed: int, overrides: dict, steps: int, progress: bool) -> Path:
    from ..config import load_config
    from ..train import train

    settings = dict(PREF, max_steps=steps)
    settings.update(overrides)
    cfg = load_config(
        None,
        train_files=[str(paths["train"])],
        eval_files=[str(paths["test"])],
        model=str(sft_dir),
        output_dir=str(out_dir),
        cache_dir=str(out_dir.parent / ".cache"),
        seed=seed,
        resume="none",
        overwrite_output_dir=True,  # an experiment re-run starts afresh
        progress=progress,
        **settings,
    )
    train(cfg)
    return out_dir / "final"


def run_experiment(name: str, seeds: List[int], out: str | Path = "runs/experiments", quick: bool = False,
                   progress: bool = True) -> dict:
    """Runs one of EXPERIMENTS over seeds; writes <out>/<name>.md/.json/.png and prints the table."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; one of {sorted(EXPERIMENTS)}")
    from ..model import quiet_libraries

    quiet_libraries()
    out = Path(out)
    started = time.time()
    sft_steps = 5 if quick else SFT["steps"]
    pref_steps = 2 if quick else PREF["max_steps"]
    samples = 1 if quick else 4
    results: Dict[str, List[dict]] = {}
    for seed in seeds:
        root = out / f"seed{seed}"
        paths = write_task(root / "task", seed)
        # The SFT model is shared by every run of a seed, and reused across experiments while its data
        # and settings are unchanged.
        key = hashlib.sha256(json.dumps([TOY_MODEL, SFT, sft_steps]).encode() + paths["sft"].read_bytes()).hexdigest()[:10]
        sft_dir = root / f"sft-{key}"
        if not (sft_dir / "config.json").exists():
            print(f"[seed {seed}] SFT ({sft_steps} steps)", flush=True)
            train_sft(paths, sft_dir, seed, sft_steps, progress)
        results.setdefault("SFT", []).append(generation_metrics(sft_dir, paths, seed, samples))
        for label, overrides in EXPERIMENTS[name]:
            run_dir = root / name / label.replace("=", "").replace(" ", "_")
            print(f"[seed {seed}] {label}: preference training ({pref_steps} steps)", flush=True)
            final = preference_run(paths, sft_dir, run_dir, seed, overrides, pref_steps, progress)
            results.setdefault(label, []).append(generation_metrics(final, paths, seed, samples))
    table = summarize(name, results, seeds)
    (out / f"{name}.md").write_text(table)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    plot(name, results, out / f"{name}.png")
    print(table)
    print(f"{name}: {time.time() - started:.0f} s; wrote {out / (name + '.md')}, .json and .png")
    return results


def _mean_spread(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def computed_as() -> str:
    """What this process computes with: PyTorch's CPU code path and the C++ kernels' instruction set (they
    decide the rounding, hence the toy's numbers; see safedpo/cpu_isa.py)."""
    import os

    from safedpo_kernels import native as native_backend

    try:
        native = native_backend.native_isa()
    except ValueError as exc:
        native = f"unavailable ({exc})"
    return (f"PyTorch {torch.__version__} on {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
            f"thread(s); C++ kernels {native}; SAFEDPO_CPU_ISA={os.environ.get('SAFEDPO_CPU_ISA', 'native')}")


def summarize(name: str, results: Dict[str, List[dict]], seeds: List[int]) -> str:
    lines = [
        f"## Toy experiment: {name} (seeds {', '.join(map(str, seeds))}; mean ± std over seeds)",
        "",
        f"Computed with {computed_as()}.",
        "",
        "| model | harmless ratio (harmful prompts) | helpfulness (benign prompts) |",
        "|---|---|---|",
    ]
    for label, rows in results.items():
        harmless, helpful = (_mean_spread([r[k] for r in rows]) for k in ("harmless_ratio", "helpfulness"))
        lines.append(f"| {label} | {harmless} | {helpful} |")
    if len(seeds) > 1:
        lines += ["", "Per seed (harmless / helpful): " + "; ".join(
            f"{label} " + ", ".join(f"{r['harmless_ratio']:.3f}/{r['helpfulness']:.3f}" for r in rows)
            for label, rows in results.items())]
    from .robustness import HARMLESS, KEEP, verdict

    if "SFT" in results and "SafeDPO" in results:
        held = sum(verdict(s, d) for s, d in zip(results["SFT"], results["SafeDPO"]))
        lines += ["", f"SafeDPO harmless >= {HARMLESS} with >= {KEEP:.0%} of SFT's helpfulness on {held} of "
                      f"{len(seeds)} seed(s)."]
    elif "SFT" in results:
        held = {label: sum(verdict(s, r) for s, r in zip(results["SFT"], rows)) for label, rows in results.items()
                if label != "SFT"}
        lines += ["", f"Harmless >= {HARMLESS} with >= {KEEP:.0%} of SFT's helpfulness, seeds that hold: " +
                  "; ".join(f"{label} {n} of {len(seeds)}" for label, n in held.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(name: str, results: Dict[str, List[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, rows in results.items():
        xs = [r["helpfulness"] for r in rows]
        ys = [r["harmless_ratio"] for r in rows]
        ax.errorbar(statistics.mean(xs), statistics.mean(ys),
                    xerr=statistics.stdev(xs) if len(xs) > 1 else 0, yerr=statistics.stdev(ys) if len(ys) > 1 else 0,
                    fmt="o", capsize=3, label=label)
    ax.set_xlabel("helpfulness on benign prompts")
    ax.set_ylabel("harmless ratio on harmful prompts")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"toy experiment: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
