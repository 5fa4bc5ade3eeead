"""linear_safedpo_loss versus eager and Liger-Kernel / Cut Cross-Entropy, forward + backward (issue #3).

    python -m bench.linear_cpu [--N 8 --T 1024 --H 256 --V 32000 --dtype float32 --repeats 3]

Issue-sized view of bench.suite's linear_safedpo_loss cases (bench.cases): each variant in a fresh
process, median time after a warm-up, peak memory increase, and the loss's deviation from eager's.
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
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=None)
    a = p.parse_args()
    cfg = cases.Config(N=a.N, T=a.T, V=a.V, H=a.H, dtype=a.dtype, device=a.device)
    print(f"linear_safedpo_loss fwd+bwd, N={a.N} T={a.T} H={a.H} V={a.V} {a.dtype} on {a.device}, median of {a.repeats}")
    run_variants("linear_safedpo_loss", cfg, a.variants, a.repeats)


if __name__ == "__main__":
    main()
