"""The benchmark suite (``make bench``): fused SafeDPO versus eager PyTorch and the usual alternatives.

    python -m bench.suite [--device cpu] [--T 256,1024,4096] [--V 32000,128256] [--ops ...] [--repeats 3]

For each op (sequence_logps, safedpo_loss, linear_safedpo_loss), size and variant it runs one case in a
fresh process (bench.cases, bench.harness): forward + backward, median and spread over ``repeats`` runs
after a warm-up, and the peak memory increase (RSS high-water mark on the CPU, max_memory_allocated on a
GPU). Each case's result value (loss or sum of log-probs) is checked against the eager variant's.
N is scaled with T and V so that every case fits in this machine's memory and the whole suite in about
a quarter of an hour on 2 cores: N x T near ``--tokens`` x 32000 / V, but at least one sequence (two for a loss).
The loss ops need N >= 2, so at T = 4096, V = 128256 a loss case holds 1e9 logits (eager: 16 GB and about
a minute per variant here): those are left out by ``--max-elements`` and covered by sequence_logps at N = 1.

Writes bench/results/<machine>-<date>.csv (one row per case), .md (tables) and .png (time and memory
against T), and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench import cases
from bench.report import markdown_table, write_csv

FIELDS = ["op", "variant", "N", "T", "V", "H", "dtype", "device", "median_s", "min_s", "max_s", "first_s",
          "peak_mb", "value", "matches_eager", "status"]


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def run_case(op: str, variant: str, cfg: cases.Config, repeats: int, timeout: int) -> dict:
    from bench.memory import run_isolated

    row = dict(op=op, variant=variant, **cfg.as_dict())
    spec = json.dumps(dict(op=op, variant=variant, cfg=cfg.as_dict(), repeats=repeats))
    try:
        r = run_isolated("bench.suite", "--one", spec, timeout=timeout)
    except Exception as exc:  # an OOM, a timeout or a library that fails here: recorded, not fatal
        msg = str(exc).strip().splitlines()
        row.update(status="failed: " + (msg[-1][:120] if msg else type(exc).__name__))
        return row
    row.update(median_s=r["median_s"], min_s=r["min_s"], max_s=r["max_s"], first_s=r["first_s"],
               peak_mb=r["peak_bytes"] / 2**20, value=r["value"], status="ok")
    return row


def one(spec: str) -> dict:
    from bench.harness import measure

    s = json.loads(spec)
    cfg = cases.Config(**s["cfg"])
    make_inputs, step = cases.build(s["op"], s["variant"], cfg)
    return measure(make_inputs, step, cfg.device, s["repeats"])


def sizes(op, T_list, V_list, device, dtype, H, tokens, max_elements):
    """N scaled so that N * T stays near ``tokens`` (x 32000 / V), never below what the op needs; loss
    cases whose N x T x V exceeds ``max_elements`` are left out (at N = 2 they would dominate the run)."""
    n_min = 1 if op == "sequence_logps" else 2
    for V in V_list:
        budget = max(1, tokens * 32000 // V)
        for T in T_list:
            if n_min == 2 and 2 * T * V > max_elements:
                continue
            N = max(n_min, budget // T)
            if n_min == 2:
                N -= N % 2  # chosen and rejected rows
            yield cases.Config(N=N, T=T, V=V, H=H, dtype=dtype, device=device)


def markdown(rows) -> str:
    columns = ["N x T", "V", "variant", "median s (min-max)", "speed-up vs eager", "peak MB", "memory vs eager", "matches"]
    out = []
    for op in cases.OPS:
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        cells = []
        for key in sorted({(r["V"], r["T"], r["N"]) for r in op_rows}):
            group = [r for r in op_rows if (r["V"], r["T"], r["N"]) == key]
            eager = next((r for r in group if r["variant"] == "eager" and r["status"] == "ok"), None)
            for r in group:
                size = [f"{key[2]} x {key[1]}", key[0], r["variant"]]
                if r["status"] != "ok":
                    cells.append(size + [r["status"]])
                    continue
                tx = f"{eager['median_s'] / r['median_s']:.2f}x" if eager else ""
                mx = f"{r['peak_mb'] / eager['peak_mb']:.3f}" if eager and eager["peak_mb"] > 0 else ""
                cells.append(size + [f"{r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f})", tx, f"{r['peak_mb']:.1f}",
                                     mx, r["matches_eager"]])
        out.append(f"\n### {op}\n\n" + markdown_table(columns, cells))
    return "\n".join(out) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in cases.OPS if any(r["op"] == op for r in rows)]
    fig, axes = plt.subplots(len(ops), 2, figsize=(12, 3.6 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        ok = [r for r in rows if r["op"] == op and r["status"] == "ok"]
        for (variant, V) in sorted({(r["variant"], r["V"]) for r in ok}):
            # Log axes: an increase under 1 MB (in-place variants) is drawn at 1 MB.
            pts = sorted((r["T"], r["median_s"], max(r["peak_mb"], 1.0)) for r in ok if r["variant"] == variant and r["V"] == V)
            style = "-" if V == min(r["V"] for r in ok) else "--"
            label = f"{variant} V={V}"
            axes[i][0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
            axes[i][1].plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=label)
        for j, what in enumerate(("median time (s)", "peak memory increase (MB)")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T (tokens per sequence)")
            ax.set_ylabel(what)
            ax.set_title(f"{op}: {what}")
            ax.grid(True, which="both", alpha=0.3)
        axes[i][1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--T", default="256,1024,4096")
    p.add_argument("--V", default="32000,128256")
    p.add_argument("--H", type=int, default=128)
    p.add_argument("--ops", default=",".join(cases.OPS))
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all available)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=1024, help="N x T budget at V = 32000 (scaled by 32000 / V)")
    p.add_argument("--max-elements", type=float, default=3e8,
                   help="loss cases (and the TRL-style variant) above this many logits (N x T x V) are skipped")
    p.add_argument("--timeout", type=int, default=300, help="seconds per case")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one)))
        return

    T_list = [int(t) for t in a.T.split(",")]
    V_list = [int(v) for v in a.V.split(",")]
    rows = []
    started = time.time()
    print(f"bench.suite on {machine_name(a.device)}: torch {torch.__version__}, {a.dtype}, repeats {a.repeats}", flush=True)
    for op in a.ops.split(","):
        names = cases.variants(op, a.device)
        if a.variants:
            names = [v for v in names if v in a.variants.split(",")]
        for cfg in sizes(op, T_list, V_list, a.device, a.dtype, a.H, a.tokens, a.max_elements):
            eager_value = None
            big = cfg.N * cfg.T * cfg.V > a.max_elements
            # The TRL-style loop is eager's arithmetic at half eager's speed: at the largest sizes it would
            # cost the suite half a minute per case and show nothing new.
            for variant in [v for v in names if not (big and v == "eager-gather")]:
                row = run_case(op, variant, cfg, a.repeats, a.timeout)
                if row["status"] == "ok" and variant == "eager":
                    eager_value = row["value"]
                if row["status"] == "ok" and eager_value is not None:
                    row["matches_eager"] = "yes" if abs(row["value"] - eager_value) <= 1e-3 * max(1.0, abs(eager_value)) else "NO"
                else:
                    row["matches_eager"] = ""
                rows.append(row)
                shown = row["status"]
                if row["status"] == "ok":
                    shown = f"{row['median_s']:.3f} s, {row['peak_mb']:.0f} MB, matches eager: {row['matches_eager']}"
                print(f"[{time.time() - started:6.0f}s] {op} N={cfg.N} T={cfg.T} V={cfg.V} {variant}: {shown}", flush=True)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{machine_name(a.device)}-{datetime.date.today().isoformat()}"
    write_csv(f"{stem}.csv", rows, FIELDS)
    header = (f"# bench.suite: {machine_name(a.device)}, torch {torch.__version__}, {a.dtype}\n\n"
              f"Forward + backward, median (min-max) of {a.repeats} runs after a warm-up, each case in a fresh process;"
              f" peak = memory increase above the inputs. Command: `{' '.join(['python -m bench.suite'] + sys.argv[1:])}`\n")
    table = header + markdown(rows)
    Path(f"{stem}.md").write_text(table)
    plot(rows, Path(f"{stem}.png"))
    print(table)
    print(f"wrote {stem}.csv, {stem}.md, {stem}.png in {time.time() - started:.0f} s")
    if any(r["status"] == "ok" and r.get("matches_eager") == "NO" for r in rows):
        sys.exit("some variant's result does not match eager's")


if __name__ == "__main__":
    main()
