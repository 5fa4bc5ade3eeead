"""Trainers side by side on the same model and data: our trainer, SafeDPOTrainer and TRL's own DPOTrainer
(which always computes its log-probs with its fused LM head), each in a fresh process, rounds interleaved.

    python -m bench.trainers [--rounds 5 --steps 6 --pairs 4 --words 120]   # throughput table
    python -m bench.trainers --curve [--budget-gib 8]                       # peak memory against length
    python -m bench.trainers --device cuda --budget-s 100 ...               # on a GPU (bench/gpu_check.sh)

The model is a tiny Llama (2 layers, hidden 256) whose vocabulary is padded to 32000, so that the LM head
and the loss over the vocabulary dominate as they do in real models; the data is the toy task's pairs
with responses of about ``--words`` words; a live reference model (another tiny Llama, so that the first
loss is not log 2 for every trainer); float32 on the CPU. On a GPU the Llama is Llama-3's head and width
(hidden 1024, vocabulary 128256, still 2 layers), float32 weights in bfloat16 autocast in every trainer
(TRL's bf16=True, our trainer's CUDA default). The loss is plain DPO (delta 0, no swap, no
drop), so every trainer computes the same loss: the first step's, before any update, must agree across
all of them (later steps differ by each trainer's learning-rate schedule, and Adam's first update,
about lr * sign(g), turns rounding-level gradient differences into visible ones). Every trainer keeps
its activations the same way: TRL's configs recompute them in the backward by default and our trainer
does not, so the benchmark sets it for all (--checkpointing: recompute; off by default).

Throughput: per variant, the median over rounds of its median step time over steps 3 to the one before
last; tokens/s counts the batch's attended tokens (DPOTrainer's num_tokens). Memory, two ways: the peak
of live tensor bytes allocated during the last step (torch.profiler's allocation events, deterministic;
bench.memory.AllocationPeak), and the resident-set high-water mark above what was resident when step 3
began (which also moves with what the C library keeps of freed memory). "Faster" needs >= 1.05x on the
median of the rounds: anything less is reported as a tie.

Curve: for each variant and length, 2 pairs whose responses have about T tokens, one warm-up step and
one measured step; the peak above the start of the measured step, and the longest T under the budget.
Writes bench/results/trainers-<machine>-<date>.md/.json (and -curve .md/.json/.png).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    # name: (trainer, loss input, compiled)
    "ours-eager": ("ours", "eager", False),
    "ours-logits": ("ours", "logits", False),
    "ours-linear": ("ours", "linear", False),
    "ours-linear-compiled": ("ours", "linear", True),
    "safedpo-trainer-logits": ("safedpo-trainer", "logits", False),
    "safedpo-trainer-linear": ("safedpo-trainer", "linear", False),
    # its reference's log-probs from the hidden states too (ref_fused_loss_input="linear")
    "safedpo-trainer-linear-ref": ("safedpo-trainer", "linear", False),
    "trl-dpo": ("trl", None, False),
}
CURVE_VARIANTS = ("ours-linear", "ours-logits", "safedpo-trainer-linear", "safedpo-trainer-linear-ref", "trl-dpo")
MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16384)
GPU_MODEL = dict(MODEL, vocab_size=128256, hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
                 num_key_value_heads=4)
LR = 1e-4


# ------------------------------------------------------------------------------ the shared inputs


def make_inputs(root: Path, pairs: int, words: int, checkpointing: bool = False, device: str = "cpu") -> dict:
    """The toy task's first ``pairs`` pairs with responses of about ``words`` words (the toy's own words,
    repeated), the toy tokenizer, and the tiny Llama policy and reference (GPU_MODEL's size for
    ``device`` "cuda") saved once: every variant loads the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from safedpo.model import load_tokenizer
    from safedpo.toy import make_task, vocabulary
    from safedpo.toy.tokenizer import build_tokenizer

    rows = make_task(seed=0, pairs_per_prompt=1)["train"][:pairs]

    def long(text: str) -> str:
        base = text.split()
        return " ".join((base * (words // max(len(base), 1) + 1))[:words])

    for r in rows:
        r["response_0"], r["response_1"] = long(r["response_0"]), long(r["response_1"])
        r["is_response_0_safe"] = r["is_response_1_safe"] = True  # T does nothing: plain DPO for every trainer
    root.mkdir(parents=True, exist_ok=True)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_tokenizer(vocabulary(), root / "model")
    tok = load_tokenizer(str(root / "model"))
    size = GPU_MODEL if device == "cuda" else MODEL
    config = LlamaConfig(**size, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    for seed, name in ((0, "model"), (1, "reference")):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(root / name)
    tok.save_pretrained(root / "reference")
    return dict(data=str(data), model=str(root / "model"), reference=str(root / "reference"), pairs=pairs, words=words,
                checkpointing=checkpointing, device=device, hidden=size["hidden_size"], vocab=size["vocab_size"])


# ------------------------------------------------------------------------------ one variant, one process


class StepClock:
    """Step times; the resident-set peak above what was resident when step ``from_step`` began; the
    allocation peak of step ``profile_step`` (profiled, so its time is not one of the timed ones). On
    CUDA the times end at a synchronization, and both peaks are torch.cuda.max_memory_allocated above the
    allocation at the start of their step (the caching allocator's own count: deterministic)."""

    def __init__(self, from_step: int, profile_step: int, device: str = "cpu"):
        self.from_step, self.profile_step, self.cuda = from_step, profile_step, device == "cuda"
        self.times, self.rss, self.alloc, self._t, self._step = [], None, None, None, 0

    def begin(self, step: int) -> None:  # 1-based
        from bench.memory import AllocationPeak, PeakMemory

        self._step = step
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            if step == self.profile_step:
                self.alloc = PeakMemory("cuda").__enter__()
        else:
            if step == self.from_step:
                self.rss = PeakMemory("cpu").__enter__()
            if step == self.profile_step:
                self.alloc = AllocationPeak().__enter__()
        self._t = time.perf_counter()

    def end(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)
        if self._step == self.profile_step:
            self.alloc.__exit__(None, None, None)

    def peaks(self) -> dict:
        alloc = 0
        if self.alloc is not None:
            alloc = self.alloc.peak_bytes if self.cuda else self.alloc.bytes
        rss = alloc if self.cuda else 0  # on CUDA, the profiled step's peak stands for both columns
        if self.rss is not None:
            self.rss.__exit__(None, None, None)
            rss = self.rss.peak_bytes
        return dict(peak_bytes=rss, alloc_bytes=alloc)


@contextlib.contextmanager
def scratch(prefix: str):
    """A temporary directory, removed on the way out (an error and Ctrl-C included): a run's models, data
    and trainer outputs take up to ~135 MB each (the curve at T~8192), and a benchmark makes dozens."""
    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as tmp:
        yield Path(tmp)


def run_ours(inputs: dict, loss_input: str, compiled: bool, steps: int, clock: StepClock, out: Path) -> dict:
    from safedpo.config import load_config
    from safedpo.train import Run

    cfg = load_config(None, train_files=[inputs["data"]], model=inputs["model"], output_dir=str(out / "run"),
                      mode="dpo-helpful", beta=0.1, batch_size=inputs["pairs"], max_steps=steps, lr=LR,
                      loss_input=loss_input, compile=compiled, reference="live", reference_model=inputs["reference"],
                      progress=False, resume="none",
                      max_prompt_length=64, max_length=16384, save_every=0, clip_grad_norm=1.0,
                      gradient_checkpointing=inputs["checkpointing"], device=inputs.get("device", "cpu"))
    run = Run(cfg)
    run.policy.train()
    losses, tokens = [], []
    for step in range(1, steps + 1):
        clock.begin(step)
        run.step()
        clock.end()
        losses.append(run.last["loss"])
        tokens.append(run.last["tokens_per_s"] * clock.times[-1])
    run.close()
    return dict(losses=losses, tokens=tokens)


def run_trl(inputs: dict, trainer: str, loss_input, steps: int, clock: StepClock, out: Path,
            ref_loss_input: str = "logits") -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from safedpo.data import prompt_text
    from safedpo_kernels.integrations.trl import SafeDPOConfig, SafeDPOTrainer

    tok = AutoTokenizer.from_pretrained(inputs["model"])
    rows = [json.loads(line) for line in open(inputs["data"])]
    # The prompt as our trainer formats it, so that both tokenize the same text into the same ids.
    data = datasets.Dataset.from_list([
        dict(prompt=prompt_text(tok, r["prompt"]), chosen=r[f"response_{r['better_response_id']}"],
             rejected=r[f"response_{1 - r['better_response_id']}"], chosen_safe=True, rejected_safe=True)
        for r in rows])
    cuda = inputs.get("device", "cpu") == "cuda"
    common = dict(output_dir=str(out / "trl"), beta=0.1, per_device_train_batch_size=len(rows),
                  max_steps=steps, learning_rate=LR, report_to="none", save_strategy="no", use_cpu=not cuda, seed=0,
                  logging_steps=1, max_length=None, dataloader_num_workers=0, precompute_ref_log_probs=False,
                  # float32 on the CPU, as our trainer there (TRL asks for bf16); bf16 autocast on CUDA, as ours
                  disable_tqdm=True, bf16=cuda, fp16=False,
                  # TRL's configs recompute the activations by default, our trainer does not: the same for all
                  gradient_checkpointing=inputs["checkpointing"])
    if trainer == "trl":
        args = DPOConfig(**common)
        cls = DPOTrainer
    else:
        args = SafeDPOConfig(**common, delta=0.0, swap=False, drop_both_unsafe=False, fused_loss_input=loss_input,
                             ref_fused_loss_input=ref_loss_input)
        cls = SafeDPOTrainer
    model = AutoModelForCausalLM.from_pretrained(inputs["model"], torch_dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(inputs["reference"], torch_dtype=torch.float32)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.begin(state.global_step + 1)

        def on_step_end(self, args, state, control, **kw):
            clock.end()

    t = cls(model=model, ref_model=reference, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h and "train_runtime" not in h]
    totals = [h["num_tokens"] for h in logs]
    return dict(losses=[h["loss"] for h in logs], tokens=[b - a for a, b in zip([0] + totals[:-1], totals)])


def child(spec: dict) -> dict:
    """One variant in this process: its step times, losses, tokens and peak."""
    import torch

    from safedpo.model import quiet_libraries

    torch.manual_seed(0)
    quiet_libraries()
    trainer, loss_input, compiled = VARIANTS[spec["variant"]]
    clock = StepClock(spec["peak_from_step"], spec["steps"], spec["inputs"].get("device", "cpu"))
    with scratch("bench-run-") as tmp:
        if trainer == "ours":
            out = run_ours(spec["inputs"], loss_input, compiled, spec["steps"], clock, tmp)
        else:
            out = run_trl(spec["inputs"], trainer, loss_input, spec["steps"], clock, tmp,
                          "linear" if spec["variant"].endswith("-ref") else "logits")
    return dict(out, times=clock.times, **clock.peaks(), variant=spec["variant"])


def isolated(spec: dict, timeout: float = 3600) -> dict:
    """``child(spec)`` in a fresh Python process (its own allocator and caches); the error on failure
    (a child past ``timeout`` seconds is killed: one that outlived a time-limited parent would hold on
    to the GPU)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        res = subprocess.run([sys.executable, "-m", "bench.trainers", "--child", json.dumps(spec)],
                             capture_output=True, text=True, env=env, timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired:
        return dict(variant=spec["variant"], error=f"killed after {timeout:.0f} s")
    if res.returncode != 0:
        return dict(variant=spec["variant"], error=(res.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ the two reports


def machine(device: str = "cpu") -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def throughput(a) -> None:
    with scratch("bench-trainers-") as root:
        inputs = make_inputs(root, a.pairs, a.words, a.checkpointing, a.device)
        names = a.variants.split(",") if a.variants else list(VARIANTS)
        runs = {n: [] for n in names}
        start = time.perf_counter()
        for r in range(a.rounds):  # interleaved: a slow spell of a shared machine hits every variant alike
            if r and a.budget_s and time.perf_counter() - start > a.budget_s * r / (r + 1):
                # a round took about (elapsed / r): another would end past the budget
                print(f"budget of {a.budget_s:.0f} s: stopping after {r} round(s)", flush=True)
                break
            for n in names:
                left = a.budget_s - (time.perf_counter() - start) if a.budget_s else 3600
                out = isolated(dict(variant=n, inputs=inputs, steps=a.steps, peak_from_step=3), timeout=max(left, 10))
                runs[n].append(out)
                shown = out.get("error") or f"{statistics.median(out['times'][2:-1]):.3f} s/step"
                print(f"round {r + 1} {n}: {shown}", flush=True)
            # Written after every round: a stage limit that stops the rounds still leaves the report of those run.
            report(summary(runs), a, inputs, show=False)
        report(summary(runs), a, inputs)


def summary(runs: dict) -> list:
    """One row per variant from its rounds: the medians, the peaks, the first round's losses."""
    rows = []
    for n, outs in runs.items():
        good = [o for o in outs if "error" not in o]
        if not good:
            rows.append(dict(variant=n, error=outs[0]["error"]))
            continue
        step_s = statistics.median(statistics.median(o["times"][2:-1]) for o in good)
        tokens = statistics.median(statistics.median(o["tokens"][2:-1]) for o in good)
        rows.append(dict(variant=n, step_s=step_s, tokens_per_s=tokens / step_s,
                         alloc_mb=max(o["alloc_bytes"] for o in good) / 2**20,
                         peak_mb=max(o["peak_bytes"] for o in good) / 2**20, first_loss=good[0]["losses"][0],
                         losses=good[0]["losses"], rounds=len(good)))
    return rows


def report(rows: list, a, inputs: dict, show: bool = True) -> None:
    from bench.variant_table import verdict  # "faster" at >= 1.05x, as in every benchmark table

    ok = {r["variant"]: r for r in rows if "error" not in r}
    losses = [r["first_loss"] for r in ok.values()]
    spread = max(losses) - min(losses) if losses else float("nan")
    rounds = min((r["rounds"] for r in ok.values()), default=0)
    cuda = inputs["device"] == "cuda"
    lines = [f"# Trainers on the same model and data ({machine(inputs['device'])}, {datetime.date.today()})", "",
             f"Llama (2 layers, hidden {inputs['hidden']}, vocabulary {inputs['vocab']}), {inputs['pairs']} pairs per "
             f"step with responses of ~{inputs['words']} words, live reference model, plain DPO, "
             f"{'bfloat16 autocast' if cuda else 'float32'}, activation checkpointing "
             f"{'on' if a.checkpointing else 'off'} in every trainer; median of {rounds} interleaved "
             f"round(s) (fresh processes) of the median step after the first two"
             f"{'' if rounds >= 5 else ': fewer than 5 rounds, so no ratio below is a verdict by the 1.05x rule'}. "
             f"`python -m bench.trainers --rounds {a.rounds} --steps {a.steps} --pairs {a.pairs} --words {a.words}"
             f"{' --checkpointing' if a.checkpointing else ''}{' --device cuda' if cuda else ''}"
             f"{f' --budget-s {a.budget_s:g}' if a.budget_s else ''}`.", "",
             "| trainer | s/step | tokens/s | peak tensor MB in a step | peak RSS MB above step 3 | step-1 loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | |")
        else:
            lines.append(f"| {r['variant']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['alloc_mb']:.0f} | "
                         f"{r['peak_mb']:.0f} | {r['first_loss']:.6f} |")
    lines += ["", f"Step-1 losses (before any update) agree to {spread:.1e} across the trainers."]
    pairs = [("safedpo-trainer-logits", "trl-dpo"), ("safedpo-trainer-linear", "trl-dpo"),
             ("safedpo-trainer-linear-ref", "trl-dpo"),
             ("ours-linear", "safedpo-trainer-linear"), ("ours-logits", "safedpo-trainer-logits"),
             ("ours-linear", "trl-dpo")]
    for mine, theirs in pairs:
        if mine in ok and theirs in ok:
            ratio = ok[theirs]["step_s"] / ok[mine]["step_s"]
            said = (verdict(ok[mine]["step_s"], ok[theirs]["step_s"]) if rounds >= 5
                    else f"{ratio:.2f}x the speed (no verdict from {rounds} round(s))")
            lines.append(f"- {mine} vs {theirs}: {said}, "
                         f"peak tensor memory {ok[mine]['alloc_mb']:.0f} vs "
                         f"{ok[theirs]['alloc_mb']:.0f} MB")
    write(lines, rows, a.out, "trainers", inputs["device"], show)


def curve(a) -> None:
    """Peak memory against the response length; the longest length under the budget per variant."""
    lengths = [int(t) for t in a.lengths.split(",")]
    names = a.variants.split(",") if a.variants else list(CURVE_VARIANTS)
    budget = a.budget_gib * 2**30
    points = {n: [] for n in names}
    for n in names:
        for T in lengths:
            with scratch(f"bench-curve-{T}-") as root:
                inputs = make_inputs(root, 2, T, a.checkpointing, a.device)
                out = isolated(dict(variant=n, inputs=inputs, steps=2, peak_from_step=2))
            if "error" in out:
                print(f"{n} T~{T}: {out['error']}", flush=True)
                points[n].append(dict(T=T, error=out["error"]))
                break
            peak = out["alloc_bytes"]
            points[n].append(dict(T=T, peak_mb=peak / 2**20, step_s=out["times"][-1]))
            print(f"{n} T~{T}: peak {peak / 2**30:.2f} GiB, {out['times'][-1]:.1f} s", flush=True)
            if peak > budget:
                break
    lines = [f"# Peak memory against response length ({machine(a.device)}, {datetime.date.today()})", "",
             f"2 pairs, responses of about T words (toy tokens: about one token per word), one training step "
             f"after a warm-up: the peak of live tensor bytes allocated during it; budget {a.budget_gib} GiB; "
             f"activation checkpointing {'on' if a.checkpointing else 'off'} in every trainer. "
             f"`python -m bench.trainers --curve --lengths {a.lengths}{' --checkpointing' if a.checkpointing else ''}`.", "",
             "| trainer | " + " | ".join(f"T~{T}" for T in lengths) + " | longest T under the budget |",
             "|---|" + "---|" * (len(lengths) + 1)]
    for n, pts in points.items():
        cells = {p["T"]: ("failed" if "error" in p else f"{p['peak_mb'] / 1024:.2f} GiB") for p in pts}
        fit = [p["T"] for p in pts if "error" not in p and p["peak_mb"] * 2**20 <= budget]
        lines.append(f"| {n} | " + " | ".join(cells.get(T, "-") for T in lengths) + f" | {max(fit) if fit else '-'} |")
    write(lines, points, a.out, "trainers-curve", a.device)
    plot_curve(points, budget, Path(a.out) / f"trainers-curve-{machine(a.device)}-{datetime.date.today()}.png")


def plot_curve(points: dict, budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n, pts in points.items():
        good = [p for p in pts if "error" not in p]
        ax.plot([p["T"] for p in good], [p["peak_mb"] / 1024 for p in good], "o-", label=n)
    ax.axhline(budget / 2**30, color="gray", linestyle="--", label="budget")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("response length T (tokens)")
    ax.set_ylabel("peak tensor memory of a training step (GiB)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write(lines: list, data, out: str, name: str, device: str = "cpu", show: bool = True) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{name}-{machine(device)}-{datetime.date.today()}"
    text = "\n".join(lines) + "\n"
    Path(f"{stem}.md").write_text(text)
    Path(f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    if show:
        print(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--words", type=int, default=120)
    p.add_argument("--variants", default="", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--curve", action="store_true", help="peak memory against the response length instead")
    p.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--checkpointing", action="store_true",
                   help="every trainer recomputes its activations in the backward (TRL's configs' default; ours: off)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when there is one")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="throughput: start no round that would end past this many seconds (0: no limit)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not a.curve and a.steps < 4:
        p.error("--steps must be at least 4: two warm-up steps, one timed, the last one profiled")
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    curve(a) if a.curve else throughput(a)


if __name__ == "__main__":
    main()
