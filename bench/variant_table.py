"""One op at one size: every variant in a fresh process (through bench.suite), printed as a table.

The issue-sized benchmark scripts (bench.logits_memory, bench.linear_cpu) are this with their defaults.
With ``--rounds R`` (R > 1) the variants run in R interleaved rounds (v1, v2, ..., then again), each
case in its own process, so that a noisy stretch of a shared machine falls on every variant alike; a
variant's time is then the median over the rounds of each round's median, and "faster" needs at least
1.05x on it (less is a tie).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench import cases
from bench.suite import run_case

FASTER = 1.05  # the least ratio of medians that the tables call faster; less is a tie


def run_variants(op: str, cfg: cases.Config, variants: str | None, repeats: int, timeout: int = 900,
                 rounds: int = 1) -> list:
    """One row per variant: the median over ``rounds`` of its median step time (``round_s``: each
    round's), the largest peak memory of its rounds, its result value, or the first failure."""
    names = variants.split(",") if variants else cases.variants(op, cfg.device)
    runs = {name: [] for name in names}
    for i in range(rounds):
        for name in names:
            r = run_case(op, name, cfg, repeats, timeout)
            runs[name].append(r)
            state = f"{r['median_s']:.3f} s, {r['peak_mb']:.0f} MB" if r["status"] == "ok" else r["status"]
            if rounds > 1:
                print(f"round {i + 1}/{rounds} {name}: {state}", flush=True)
    rows = []
    for rs in runs.values():
        bad = next((r for r in rs if r["status"] != "ok"), None)
        if bad:
            rows.append(bad)
            continue
        times = [r["median_s"] for r in rs]
        rows.append(dict(rs[0], median_s=statistics.median(times), round_s=times,
                         peak_mb=max(r["peak_mb"] for r in rs), first_s=statistics.median(r["first_s"] for r in rs)))
    print_table(rows, rounds)
    return rows


def verdict(a: float, b: float) -> str:
    """How time ``a`` compares with ``b``: faster / slower by the ratio, or a tie under FASTER."""
    x = b / a
    return f"{x:.2f}x faster" if x >= FASTER else f"{1 / x:.2f}x slower" if 1 / x >= FASTER else f"tie ({x:.2f}x)"


def print_table(rows: list, rounds: int) -> None:
    spread = "   rounds (s)" if rounds > 1 else ""
    print(f"{'variant':20} {'median s':>9} {'x faster':>9} {'warm-up s':>10} {'peak MB':>9} {'x eager':>8} "
          f"{'vs eager':>9}{spread}")
    base = None
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['variant']:20} {r['status']}")
            continue
        base = base or r
        dev = abs(r["value"] - base["value"]) / max(1.0, abs(base["value"]))
        extra = "   " + " ".join(f"{t:.3f}" for t in r["round_s"]) if rounds > 1 else ""
        print(f"{r['variant']:20} {r['median_s']:9.3f} {base['median_s'] / r['median_s']:9.2f} {r['first_s']:10.2f} "
              f"{r['peak_mb']:9.1f} {r['peak_mb'] / max(base['peak_mb'], 1e-9):8.3f} {dev:9.1e}{extra}", flush=True)


def main(op: str, doc: str, argv=None, **defaults) -> list:
    """Command line of an issue-sized script: sizes (defaults given), dtype, device, repeats, rounds,
    variants."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("N", "T", "V", "H"):
        p.add_argument(f"--{name}", type=int, default=defaults.get(name, 256 if name == "H" else None))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=defaults.get("repeats", 3))
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every variant (5 to call one faster)")
    p.add_argument("--variants", default=None, help="comma-separated subset (default: every variant available)")
    a = p.parse_args(argv)
    cfg = cases.Config(N=a.N, T=a.T, V=a.V, H=a.H, dtype=a.dtype, device=a.device)
    size = f"N={a.N} T={a.T}" + (f" H={a.H}" if op.startswith("linear") else "") + f" V={a.V}"
    print(f"{op} fwd+bwd, {size} {a.dtype} on {a.device}, median of {a.repeats} after a warm-up"
          + (f", {a.rounds} interleaved rounds (the median of the rounds' medians)" if a.rounds > 1 else ""))
    return run_variants(op, cfg, a.variants, a.repeats, rounds=a.rounds)
