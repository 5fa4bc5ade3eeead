"""Trainer throughput on the CPU: tokens per second of a tiny SafeDPO run per loss input, eager and
compiled.

    python -m bench.trainer_tokens [--steps 20 --vocab 32000 --batch-size 8] [--no-compile]

The toy task's data, a tiny Llama (2 layers, 64 wide) whose vocabulary is padded to ``--vocab`` so that
the loss over the vocabulary matters as it does in real models; loss_input = eager (plain PyTorch
log-softmax of the logits), logits (fused kernel, in-place backward) and linear (no logits), each also
with compile: true (torch.compile, inductor, of the policy's forward and loss). Reports the median tokens/s
over the steps after the first two (the compiled runs compile there) and the final loss of each (they
must agree).
"""

from __future__ import annotations

import argparse
import json
import statistics


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-compile", action="store_true", help="the eager runs only")
    a = p.parse_args()
    from bench.trainers import scratch
    from safedpo.config import load_config
    from safedpo.toy.pipeline import write_task
    from safedpo.train import train

    with scratch("safedpo-tokens-") as root:
        paths = write_task(root / "task", 0)
        print(f"tiny Llama, vocab {a.vocab}, {a.batch_size} pairs per step, {a.steps} steps, CPU")
        print(f"{'loss_input':10} {'compile':>8} {'tokens/s':>10} {'x eager':>8} {'last loss':>10}")
        base = None
        for loss_input in ("eager", "logits", "linear"):
            for compiled in (False,) if a.no_compile else (False, True):
                out = root / f"{loss_input}-{compiled}"
                cfg = load_config(
                    None, train_files=[str(paths["train"])], tokenizer=str(paths["tokenizer"]), output_dir=str(out),
                    cache_dir=str(root / "cache"), tiny_model=dict(vocab_size=a.vocab), loss_input=loss_input,
                    batch_size=a.batch_size, max_steps=a.steps, lr=1e-4, progress=False, resume="none", compile=compiled,
                )
                train(cfg)
                rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
                steps = [r for r in rows if "tokens_per_s" in r]
                tps = statistics.median(r["tokens_per_s"] for r in steps[2:])
                base = base or tps
                print(f"{loss_input:10} {str(compiled):>8} {tps:10.0f} {tps / base:8.2f} {steps[-1]['loss']:10.6f}", flush=True)


if __name__ == "__main__":
    main()
