"""A table of one op's variants at one size, each run in a fresh process through bench.suite."""

from __future__ import annotations

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
