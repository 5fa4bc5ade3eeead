"""One op at one size: every variant in a fresh process (through bench.suite), printed as a table.

The issue-sized benchmark scripts (bench.logits_memory, bench.linear_cpu) are this with their defaults.
"""

from __future__ import annotations

import argparse

import torch

from bench import cases
from bench.suite import run_case


def run_variants(op: str, cfg: cases.Config, variants: str | None, repeats: int, timeout: int = 900) -> list:
    names = variants.split(",") if variants else cases.variants(op, cfg.device)
    print(f"{'variant':16} {'median s':>9} {'x faster':>9} {'warm-up s':>10} {'peak MB':>9} {'x eager':>8} {'vs eager':>9}")
    rows, base = [], None
    for name in names:
        r = run_case(op, name, cfg, repeats, timeout)
        rows.append(r)
        if r["status"] != "ok":
            print(f"{name:16} {r['status']}")
            continue
        base = base or r
        dev = abs(r["value"] - base["value"]) / max(1.0, abs(base["value"]))
        print(f"{name:16} {r['median_s']:9.3f} {base['median_s'] / r['median_s']:9.2f} {r['first_s']:10.2f} "
              f"{r['peak_mb']:9.1f} {r['peak_mb'] / max(base['peak_mb'], 1e-9):8.3f} {dev:9.1e}", flush=True)
    return rows


def main(op: str, doc: str, argv=None, **defaults) -> list:
    """Command line of an issue-sized script: sizes (defaults given), dtype, device, repeats, variants."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("N", "T", "V", "H"):
        p.add_argument(f"--{name}", type=int, default=defaults.get(name, 256 if name == "H" else None))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=defaults.get("repeats", 3))
    p.add_argument("--variants", default=None, help="comma-separated subset (default: every variant available)")
    a = p.parse_args(argv)
    cfg = cases.Config(N=a.N, T=a.T, V=a.V, H=a.H, dtype=a.dtype, device=a.device)
    size = f"N={a.N} T={a.T}" + (f" H={a.H}" if op.startswith("linear") else "") + f" V={a.V}"
    print(f"{op} fwd+bwd, {size} {a.dtype} on {a.device}, median of {a.repeats} after a warm-up")
    return run_variants(op, cfg, a.variants, a.repeats)
