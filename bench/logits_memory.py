"""sequence_logps forward + backward: fused backends versus eager PyTorch and torch.compile.

    python -m bench.logits_memory [--N 8 --T 1024 --V 32000 --dtype float32 --repeats 5]

Issue-sized view of bench.suite's sequence_logps cases (bench.cases): each variant in a fresh process,
median time over ``repeats`` runs after a warm-up (whose time, including torch.compile's compilation, is
reported apart), the peak memory increase above the resident logits (RSS high-water mark on the CPU,
max_memory_allocated on CUDA) and the result's deviation from eager's. A quarter of each row is prompt.
"""

from __future__ import annotations

import argparse

import torch

from bench import cases
from bench.cli import run_variants


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=8)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default=None)
    a = p.parse_args()
    cfg = cases.Config(N=a.N, T=a.T, V=a.V, dtype=a.dtype, device=a.device)
    print(f"sequence_logps fwd+bwd, N={a.N} T={a.T} V={a.V} {a.dtype} on {a.device}, median of {a.repeats} after a warm-up")
    run_variants("sequence_logps", cfg, a.variants, a.repeats)


if __name__ == "__main__":
    main()
