"""The GPU benchmark of bench/gpu_check.sh: ceilings, then fused versus eager and the other libraries.

    python -m bench.gpu_bench --out DIR            # on a CUDA machine
    python -m bench.gpu_bench --dry-run --out DIR  # tiny sizes on the CPU (Triton interpreter)

1. Ceilings: device-to-device copy bandwidth and the bf16 matmul rate.
2. Logits path at N=8, T=4096, V=128256 bf16 (sequence_logps: triton vs eager vs torch.compile) and
   fused-linear path with H=4096 (linear_safedpo_loss: triton vs Liger vs Cut Cross-Entropy vs eager),
   forward + backward, median of 3 after a warm-up, peak memory (max_memory_allocated above the inputs),
   and the time over its floor: bytes that must move / measured bandwidth for the logits path, matmul
   work / measured matmul rate for the linear path.
3. The same ops at the shape PKU-SafeRLHF training has: 64 pairs of short sequences (64-128 tokens per
   side), V = 32000 and 151936, padded and packed (cu_seqlens).
Cases that would start after --budget-s seconds are skipped, so that gpu_check.sh stays under 8 minutes.
Writes gpu-<card>.csv and gpu-<card>.md under --out and prints the table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import time
from pathlib import Path

import torch

from bench import cases
from bench.harness import measure
from bench.report import markdown_table, write_csv


def info(device: str) -> dict:
    import triton

    d = dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)
    if device == "cuda":
        d["card"] = torch.cuda.get_device_name()
        try:
            d["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            d["driver"] = "unknown"
    else:
        d["card"] = "cpu (dry run)"
    return d


def _timed(fn, device: str, iters: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def ceilings(device: str, dry: bool) -> dict:
    n_bytes = (1 << 20) if dry else (1 << 30)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = _timed(lambda: dst.copy_(src), device, 3 if dry else 20)
    bandwidth = 2 * n_bytes / t  # read + write
    del src, dst
    n = 256 if dry else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = _timed(lambda: a @ b, device, 2 if dry else 20)
    return dict(bandwidth_Bps=bandwidth, bf16_flops=2 * n**3 / t)


@torch.no_grad()
def reference_value(op: str, cfg: cases.Config) -> float:
    """The case's value computed in float32 by the chunked torch backend: what every variant, eager bf16
    included, is compared with (eager rounds the bf16 logits it materializes, so it is no oracle here)."""
    from safedpo_kernels import linear_safedpo_loss, sequence_logps

    make_inputs, _ = cases.build(op, "eager", cfg)
    inputs = [t.detach().float() if t is not None and t.is_floating_point() else t for t in make_inputs()]
    if op == "sequence_logps":
        logits, labels, cu = inputs
        return float(sequence_logps(logits, labels, cu_seqlens=cu, backend="torch").double().sum())
    hidden, weight, labels, cu = inputs
    ref = torch.zeros(cfg.N, device=cfg.device)
    safe = torch.ones(cfg.N // 2, dtype=torch.bool, device=cfg.device)
    return float(linear_safedpo_loss(hidden, weight, labels, ref, safe, safe, beta=cases.BETA, cu_seqlens=cu,
                                     backend="torch").loss)


def tolerance(cfg: cases.Config) -> float:
    """Relative deviation allowed: float32 cases are exact to 1e-4; bf16 ones carry bf16 rounding of
    logits in the eager and library variants (thousands of tokens summed), so only gross errors fail."""
    return 1e-4 if cfg.dtype == "float32" else 5e-2


def plan(dry: bool) -> list:
    """(op, cfg, variants): the long-sequence case, then the shape PKU-SafeRLHF training has -- 64 pairs
    of short sequences (64-128 tokens per side, about 100 on average), padded and packed, at V = 32000
    (Llama 2, Mistral) and 151936 (Qwen2)."""
    logits_variants = ["eager", "compile", "triton", "triton-inplace"]
    linear_variants = ["eager", "ours-triton", "liger", "cce"]
    if dry:
        long = cases.Config(N=2, T=16, V=300, H=32, dtype="float32", device="cpu")
        short = [cases.Config(N=4, T=12, V=V, H=32, dtype="float32", device="cpu", ragged=True, packed=p)
                 for V in (300,) for p in (False, True)]
    else:
        long = cases.Config(N=8, T=4096, V=128256, H=4096, dtype="bfloat16", device="cuda")
        short = [cases.Config(N=128, T=128, V=V, H=4096, dtype="bfloat16", device="cuda", ragged=True, packed=p)
                 for V in (32000, 151936) for p in (False, True)]
    out = [("sequence_logps", long, logits_variants), ("linear_safedpo_loss", long, linear_variants)]
    # torch.compile recompiles for every shape (about a minute each): measured on the long case only.
    out += [("sequence_logps", cfg, ["eager", "trl", "triton", "triton-inplace"]) for cfg in short]
    out += [("linear_safedpo_loss", cfg, linear_variants) for cfg in short]
    return out


def run(dry: bool, out: Path, budget_s: float = 330.0) -> list:
    device = "cpu" if dry else "cuda"
    meta = info(device)
    print("== device ==")
    for k, v in meta.items():
        print(f"{k}: {v}")
    ceil = ceilings(device, dry)
    print(f"== ceilings ==\ndevice-to-device copy: {ceil['bandwidth_Bps'] / 1e9:.1f} GB/s, bf16 matmul: {ceil['bf16_flops'] / 1e12:.1f} TFLOP/s")

    rows = []
    start = time.perf_counter()
    for op, cfg, names in plan(dry):
        available = cases.variants(op, "cuda") if not dry else names
        truth = reference_value(op, cfg)
        eager_s = None
        for variant in names:
            row = dict(op=op, variant=variant, **cfg.as_dict())
            rows.append(row)
            if cfg.packed and variant in cases.PADDED_ONLY:
                row["status"] = "padded batches only"
                continue
            if variant not in available:
                row["status"] = "not installed"
                continue
            if dry and variant in ("compile", "liger", "cce"):
                row["status"] = "skipped in dry run"
                continue
            if time.perf_counter() - start > budget_s:
                row["status"] = f"skipped: past the {budget_s:.0f} s budget"
                continue
            try:
                make_inputs, step = cases.build(op, variant, cfg)
                r = measure(make_inputs, step, device, repeats=1 if dry else 3)
            except Exception as exc:  # OOM for eager at full size is a result, not a crash
                msg = str(exc).strip().splitlines()
                row["status"] = "failed: " + (msg[0][:100] if msg else type(exc).__name__)
                print(f"{op} {cfg.label()} {variant}: {row['status']}", flush=True)
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            if op == "linear_safedpo_loss":
                floor_s = cases.floor_flops(op, cfg) / ceil["bf16_flops"]
            else:
                floor_s = cases.floor_bytes(op, cfg) / ceil["bandwidth_Bps"]
            eager_s = r["median_s"] if variant == "eager" else eager_s
            row.update(
                status="ok", median_s=r["median_s"], min_s=r["min_s"], max_s=r["max_s"], first_s=r["first_s"],
                peak_mb=r["peak_bytes"] / 2**20, value=r["value"], floor_s=floor_s, x_floor=r["median_s"] / floor_s,
                x_eager=(eager_s / r["median_s"]) if eager_s else None,
                deviation=abs(r["value"] - truth) / max(1.0, abs(truth)),
                matches=("yes" if abs(r["value"] - truth) <= tolerance(cfg) * max(1.0, abs(truth)) else "NO"),
            )
            print(f"{op} {cfg.label()} V={cfg.V} {variant}: {r['median_s'] * 1e3:.1f} ms, {row['peak_mb']:.0f} MB, "
                  f"{row['x_floor']:.1f}x floor", flush=True)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()

    out.mkdir(parents=True, exist_ok=True)
    card = meta["card"].replace(" ", "-").replace("(", "").replace(")", "")
    stem = out / f"gpu-{card}"
    fields = ["op", "variant", "N", "T", "V", "H", "dtype", "device", "ragged", "packed", "median_s", "min_s", "max_s",
              "first_s", "peak_mb", "floor_s", "x_floor", "x_eager", "value", "deviation", "matches", "status"]
    write_csv(f"{stem}.csv", rows, fields)
    cells = []
    for r in rows:
        size = f"{cases.Config(**{k: r[k] for k in cases.Config.__dataclass_fields__}).label()}, {r['V']}, {r['H']}"
        if r.get("status") != "ok":
            cells.append([r["op"], size, r["variant"], r["status"]])
            continue
        cells.append([r["op"], size, r["variant"],
                      f"{r['median_s'] * 1e3:.1f} ({r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f})",
                      f"{r['x_eager']:.2f}" if r.get("x_eager") else "", f"{r['peak_mb']:.0f}", f"{r['x_floor']:.2f}",
                      f"{r['deviation']:.1e}", r["matches"]])
    columns = ["op", "N x T, V, H", "variant", "median ms (min-max)", "x eager", "peak MB", "x floor",
               "deviation from float32", "ok"]
    lines = [
        f"# GPU check: {meta['card']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta.get('cuda')}, driver {meta.get('driver', '-')}; "
        f"copy bandwidth {ceil['bandwidth_Bps'] / 1e9:.1f} GB/s, bf16 matmul {ceil['bf16_flops'] / 1e12:.1f} TFLOP/s.",
        "Forward + backward, median (min-max) of 3 after a warm-up; peak = max_memory_allocated above the inputs;",
        "floor = 3 passes over the logits / copy bandwidth (logits path) or 3 matmuls over the response tokens /",
        "bf16 matmul rate (linear path). Short cases: 64 pairs of 64-128 tokens per side, padded (N x T with the",
        "tail ignored) or packed (cu_seqlens, no padding).",
        "",
        markdown_table(columns, cells),
    ]
    table = "\n".join(lines) + "\n"
    Path(f"{stem}.md").write_text(table)
    Path(f"{stem}.json").write_text(json.dumps(dict(info=meta, ceilings=ceil), indent=1))
    print(table)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="cases that would start after this many seconds are skipped (keeps gpu_check.sh under 8 minutes)")
    a = p.parse_args()
    rows = run(a.dry_run, Path(a.out), a.budget_s)
    bad = [r for r in rows if r.get("matches") == "NO"]
    if bad or (a.dry_run and any(r.get("status", "").startswith("failed") for r in rows)):
        raise SystemExit("gpu_bench: a case failed or does not match eager")


if __name__ == "__main__":
    main()
