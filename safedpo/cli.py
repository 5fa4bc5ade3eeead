"""Command line: ``safedpo train|eval|toy|experiment`` (also ``python -m safedpo``).

    safedpo train --config run.yaml [key=value ...]      train (under torchrun for many processes)
    safedpo eval --config run.yaml checkpoint=DIR|base [key=value ...]
                                                         held-out metrics of a saved model
    safedpo eval --generate --config run.yaml checkpoint=DIR|base [judge=classifier:DIR] [samples_file=F]
                                                         sampled responses, judged: harmless ratio
    safedpo toy [--out DIR] [--seed 0]                  write the embedded toy task (data + tokenizer)
    safedpo experiment NAME [--seeds 0,1,2]             the toy experiments (make train runs one)
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _train(args) -> int:
    from .config import load_config
    from .guards import INTERRUPTED_STATUS, NONFINITE_STATUS, Interrupted, NonFiniteError
    from .train import train

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg)
    except NonFiniteError as exc:
        print(f"safedpo: error: {exc}", file=sys.stderr)
        return NONFINITE_STATUS
    except Interrupted as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"safedpo: {exc}", file=sys.stderr, flush=True)
        return INTERRUPTED_STATUS
    if "loss" in result and os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, float) or v == v}, default=str))
    return 0


def _eval(args) -> int:
    from .config import load_config
    from .evaluate import evaluate_checkpoint, generation_report

    own = ("checkpoint=", "samples_file=")
    overrides = [o for o in args.overrides if not o.startswith(own)]
    extra = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in args.overrides if o.startswith(own)}
    cfg = load_config(args.config, overrides)
    if args.generate:
        result = generation_report(cfg, extra.get("checkpoint"), extra.get("samples_file"))
    else:
        result = evaluate_checkpoint(cfg, extra.get("checkpoint"))
    print(json.dumps(result, indent=1))
    return 0


def _toy(args) -> int:
    from .toy.pipeline import write_task

    paths = write_task(args.out, args.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return 0


def _experiment(args) -> int:
    if args.isa:
        from .cpu_isa import restart_as

        restart_as(args.isa)  # returns in a process that computes as an args.isa machine does
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .toy.pipeline import run_experiment

    seeds = [int(s) for s in args.seeds.split(",")]
    run_experiment(args.name, seeds, args.out, quick=args.quick)
    return 0


def keys_help() -> str:
    from .config import keys_help as text

    return "config keys:\n" + text()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="safedpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with a YAML config and key=value overrides",
                       description="Train with a YAML file of key: value pairs (--config), overridden by key=value "
                                   "arguments. The keys, their defaults and what they mean:",
                       epilog=keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", default=None, help="a YAML file of key: value pairs")
    t.add_argument("overrides", nargs="*", help="key=value (YAML values: 5e-6, true, [a.jsonl, b.jsonl])")
    t.set_defaults(fn=_train)
    e = sub.add_parser("eval", help="held-out pair metrics of a trained model, or with --generate judged samples",
                       description="checkpoint=<run>/final (a saved model), <run>/checkpoints/step-N (a training "
                                   "checkpoint) or base (the configured model, untrained) names the model; other "
                                   "key=value arguments are config keys (safedpo train --help lists them).")
    e.add_argument("--config", default=None)
    e.add_argument("--generate", action="store_true", help="sample responses and judge them (judge=...)")
    e.add_argument("overrides", nargs="*")
    e.set_defaults(fn=_eval)
    y = sub.add_parser("toy", help="write the toy task's data and tokenizer")
    y.add_argument("--out", default="runs/toy")
    y.add_argument("--seed", type=int, default=0)
    y.set_defaults(fn=_toy)
    x = sub.add_parser("experiment", help="baselines | delta-sweep | noswap | label-noise | sft-weight | default")
    x.add_argument("name")
    x.add_argument("--seeds", default="0,1,2")
    x.add_argument("--out", default="runs/experiments")
    x.add_argument("--quick", action="store_true", help="a handful of steps (for smoke tests)")
    x.add_argument("--isa", choices=("native", "avx512", "avx2", "default"), default=None,
                   help="compute as a machine with this instruction set does (see safedpo/cpu_isa.py)")
    x.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    x.set_defaults(fn=_experiment)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as exc:  # bad input, a missing file, an output that cannot be written
        print(f"safedpo: error: {exc}", file=sys.stderr)
        return 2
