"""The GPU benchmark of bench/gpu_check.sh: ceilings, then fused versus eager and the other libraries.

    python -m bench.gpu_bench --out DIR            # on a CUDA machine
    python -m bench.gpu_bench --dry-run --out DIR  # tiny sizes on the CPU (Triton interpreter)

1. Ceilings: device-to-device copy bandwidth and the bf16 matmul rate.
2. Logits path at N=8, T=4096, V=128256 bf16 (sequence_logps: triton, in place, vs eager), forward +
   backward, median of 3 after a warm-up, peak memory (max_memory_allocated above the inputs), and the
   time over its floor: bytes that must move / measured bandwidth.
3. Liger-Kernel's own DPO benchmark case (their benchmark/scripts/benchmark_dpo_loss.py: B=32 rows =
   16 pairs, T=512, H=1024, V=128256, bf16, a bias, and a reference model whose hidden states and head
   give the reference log-probs inside the step): ours fused-linear (Triton GEMM and cuBLAS chunked),
   ours on materialized logits with in-place backward, Liger's LigerFusedLinearDPOLoss, Cut
   Cross-Entropy and eager, beside the H100 figures Liger publishes for that case.
4. The fused-linear path at N=8, T=4096, H=4096, V=128256 against the 3-matmul floor (3 x 2·M·H·V over
   the M counted tokens / the measured bf16 matmul rate), the same variants.
5. Tile settings, at most two per path, through the launchers' environment variables.
6. The shape PKU-SafeRLHF training has: 64 pairs of short sequences (64-128 tokens per side),
   V = 32000 and 151936, padded and packed (cu_seqlens); then torch.compile of the eager logits path
   (a minute of compilation, so last).
Cases that would start after --budget-s seconds are skipped, so that gpu_check.sh stays within its time.
Writes gpu-<card>-<date>.csv/.md/.json under --out and prints the table and the targets last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
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


def _copy_time(n_bytes: int, device: str, iters: int) -> float:
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _timed(lambda: dst.copy_(src), device, iters)


def ceilings(device: str, dry: bool) -> dict:
    n_bytes = (1 << 20) if dry else (1 << 30)
    bandwidth = 2 * n_bytes / _copy_time(n_bytes, device, 3 if dry else 20)  # read + write
    n = 256 if dry else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = _timed(lambda: a @ b, device, 2 if dry else 20)
    return dict(bandwidth_Bps=bandwidth, bf16_flops=2 * n**3 / t)


def _float32(t):
    if isinstance(t, tuple):
        return tuple(_float32(x) for x in t)
    return t.detach().float() if t is not None and t.is_floating_point() else t


@torch.no_grad()
def reference_value(op: str, cfg: cases.Config) -> float:
    """The case's value computed in float32 by the chunked torch backend: what every variant, eager bf16
    included, is compared with (eager rounds the bf16 logits it materializes, so it is no oracle here)."""
    from safedpo_kernels import linear_safedpo_loss, linear_sequence_logps, sequence_logps

    make_inputs, _ = cases.build(op, "eager", cfg)
    inputs = [_float32(t) for t in make_inputs()]
    if op == "sequence_logps":
        logits, labels, cu = inputs
        return float(sequence_logps(logits, labels, cu_seqlens=cu, backend="torch").double().sum())
    hidden, weight, bias, labels, cu, ref = inputs
    if ref is None:
        ref_logps = torch.zeros(cfg.N, device=cfg.device)
    else:
        ref_hidden, ref_weight, ref_bias = ref
        ref_logps = linear_sequence_logps(ref_hidden, ref_weight, labels, bias=ref_bias, cu_seqlens=cu, backend="torch")
    safe = torch.ones(cfg.N // 2, dtype=torch.bool, device=cfg.device)
    return float(linear_safedpo_loss(hidden, weight, labels, ref_logps, safe, safe, bias=bias, beta=cases.BETA,
                                     cu_seqlens=cu, backend="torch").loss)


def tolerance(cfg: cases.Config) -> float:
    """Relative deviation allowed: float32 cases are exact to 1e-4; bf16 ones carry bf16 rounding of
    logits in the eager and library variants (thousands of tokens summed), so only gross errors fail."""
    return 1e-4 if cfg.dtype == "float32" else 5e-2


# trl-head: TRL 1.16's fused LM head as its DPOTrainer calls it (log-probs with entropy, mean logits and top-1
# flags), the baseline every TRL user has; ours-triton-stats: ours computing the same statistics.
LINEAR_VARIANTS = ["eager", "ours-triton", "ours-torch", "ours-triton-stats", "logits-triton-inplace", "trl-head",
                   "liger", "cce"]
# Liger-Kernel's published H100 numbers for their DPO case (B=32, T=512, H=1024, V=128256, bf16, with a
# reference model, forward + backward), from the README of their benchmark: time, peak memory.
LIGER_PUBLISHED = {"liger": (56.6e-3, 2.92e9), "torch": (66.9e-3, 25.4e9)}


def configs(dry: bool) -> dict:
    """The named sizes of the plan; tiny CPU ones in the dry run."""
    if dry:
        return dict(
            long=cases.Config(N=2, T=16, V=300, H=32, dtype="float32", device="cpu"),
            liger=cases.Config(N=4, T=16, V=300, H=32, dtype="float32", device="cpu", bias=True, ref_model=True),
            short=[cases.Config(N=4, T=12, V=300, H=32, dtype="float32", device="cpu", ragged=True, packed=p)
                   for p in (False, True)],
        )
    return dict(
        long=cases.Config(N=8, T=4096, V=128256, H=4096, dtype="bfloat16", device="cuda"),
        liger=cases.Config(N=32, T=512, V=128256, H=1024, dtype="bfloat16", device="cuda", bias=True, ref_model=True),
        short=[cases.Config(N=128, T=128, V=V, H=4096, dtype="bfloat16", device="cuda", ragged=True, packed=p)
               for V in (32000, 151936) for p in (False, True)],
    )


def plan(dry: bool) -> list:
    """(op, cfg, variants, settings) in the order they run: what the targets need first, then tile
    settings (environment overrides of the launchers, at most two per path), then the PKU-SafeRLHF
    shapes, and torch.compile last."""
    c = configs(dry)
    long, liger = c["long"], c["liger"]
    out = [("sequence_logps", long, ["eager", "triton", "triton-inplace"], {}),
           ("linear_safedpo_loss", liger, LINEAR_VARIANTS, {}),
           ("linear_safedpo_loss", long, LINEAR_VARIANTS, {})]
    # Logits path: half and twice the default 8192-element vocabulary step.
    out += [("sequence_logps", long, ["triton-inplace"], {"SAFEDPO_TRITON_BLOCK_V": "4096"}),
            ("sequence_logps", long, ["triton-inplace"], {"SAFEDPO_TRITON_BLOCK_V": "16384", "SAFEDPO_TRITON_TILE": "16384"})]
    # Fused-linear path: the logits GEMM by cuBLAS instead of the Triton kernel; 256-wide vocabulary tiles;
    # and the loss's chunk budget at 1 GiB (memory against the per-chunk d weight update).
    for cfg in (long, liger):
        out += [("linear_safedpo_loss", cfg, ["ours-triton"], {"SAFEDPO_LINEAR_GEMM": "cublas"}),
                ("linear_safedpo_loss", cfg, ["ours-triton"], {"SAFEDPO_LINEAR_BLOCK_N": "256"}),
                ("linear_safedpo_loss", cfg, ["ours-triton", "ours-torch"], {"SAFEDPO_LINEAR_CHUNK_BYTES": str(1 << 30)})]
    # The PKU-SafeRLHF shapes (Liger recompiles for each).
    out += [("sequence_logps", cfg, ["eager", "eager-gather", "triton", "triton-inplace"], {}) for cfg in c["short"]]
    out += [("linear_safedpo_loss", cfg, ["eager", "ours-triton", "ours-torch", "trl-head", "liger", "cce"], {})
            for cfg in c["short"]]
    # torch.compile recompiles for every shape (about a minute each): the long case only.
    out.append(("sequence_logps", long, ["compile"], {}))
    return out


@contextlib.contextmanager
def environment(settings: dict):
    """The launchers read their SAFEDPO_* overrides at each call: set them for one case, then restore."""
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def settings_label(settings: dict) -> str:
    return " ".join(f"{k.replace('SAFEDPO_', '')}={v}" for k, v in settings.items()) or "default"


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run(dry: bool, out: Path, budget_s: float = 330.0) -> tuple:
    device = "cpu" if dry else "cuda"
    meta = info(device)
    print("== device ==")
    for k, v in meta.items():
        print(f"{k}: {v}")
    ceil = ceilings(device, dry)
    print(f"== ceilings ==\ndevice-to-device copy: {ceil['bandwidth_Bps'] / 1e9:.1f} GB/s, "
          f"bf16 matmul: {ceil['bf16_flops'] / 1e12:.1f} TFLOP/s", flush=True)

    rows = []
    truths = {}
    start = time.perf_counter()
    for op, cfg, names, settings in plan(dry):
        # The dry run also runs Liger and CCE on the CPU (their calls are checked before GPU time is spent).
        available = (cases.variants(op, "cuda") + ["logits-triton-inplace"] if not dry else
                     [v for v in names if v not in ("liger", "cce") or v in cases.variants(op, "cpu")])
        eager_s = None
        for variant in names:
            row = dict(op=op, variant=variant, settings=settings_label(settings), **cfg.as_dict())
            rows.append(row)
            if cfg.packed and variant in cases.PADDED_ONLY:
                row["status"] = "padded batches only"
                continue
            if variant not in available:
                row["status"] = "not installed"
                continue
            if dry and variant == "compile":
                row["status"] = "skipped in dry run"
                continue
            if time.perf_counter() - start > budget_s:
                row["status"] = f"skipped: past the {budget_s:.0f} s budget"
                continue
            key = (op, json.dumps(cfg.as_dict(), sort_keys=True))
            try:
                if key not in truths:
                    truths[key] = reference_value(op, cfg)
                    free(device)
                truth = truths[key]
                with environment(settings):
                    make_inputs, step = cases.build(op, variant, cfg)
                    r = measure(make_inputs, step, device, repeats=1 if dry else 3)
            except Exception as exc:  # OOM for eager at full size is a result, not a crash
                msg = str(exc).strip().splitlines()
                row["status"] = "failed: " + (msg[0][:100] if msg else type(exc).__name__)
                print(f"{op} {cfg.label()} {variant} [{row['settings']}]: {row['status']}", flush=True)
                free(device)
                continue
            if op == "linear_safedpo_loss":
                floor_s = cases.floor_flops(op, cfg) / ceil["bf16_flops"]
            else:
                floor_s = cases.floor_bytes(op, cfg) / ceil["bandwidth_Bps"]
            eager_s = r["median_s"] if variant == "eager" else eager_s
            row.update(
                status="ok", median_s=r["median_s"], min_s=r["min_s"], max_s=r["max_s"], first_s=r["first_s"],
                peak_mb=r["peak_bytes"] / 2**20, total_peak_mb=r["total_peak_bytes"] / 2**20, value=r["value"],
                floor_s=floor_s, x_floor=r["median_s"] / floor_s, x_eager=(eager_s / r["median_s"]) if eager_s else None,
                deviation=abs(r["value"] - truth) / max(1.0, abs(truth)),
                matches=("yes" if abs(r["value"] - truth) <= tolerance(cfg) * max(1.0, abs(truth)) else "NO"),
            )
            print(f"{op} {cfg.label()} V={cfg.V} H={cfg.H} {variant} [{row['settings']}]: {r['median_s'] * 1e3:.1f} ms, "
                  f"{row['peak_mb']:.0f} MB (total {row['total_peak_mb']:.0f}), {row['x_floor']:.2f}x floor, "
                  f"deviation {row['deviation']:.1e}", flush=True)
            free(device)
    write(rows, meta, ceil, out, dry)
    return rows, meta, ceil


def _find(rows, op, cfg, variant, settings="default"):
    for r in rows:
        if (r["op"], r["variant"], r["settings"], r["status"]) == (op, variant, settings, "ok") and \
                all(r[k] == v for k, v in cfg.as_dict().items()):
            return r
    return None


def targets(rows: list, dry: bool) -> list:
    """The issue's targets, each with what this run measured and PASS / MISS (or 'not measured')."""
    c = configs(dry)
    long, liger_cfg = c["long"], c["liger"]
    lines = []

    def verdict(ok):
        return "PASS" if ok else "MISS"

    inplace = _find(rows, "sequence_logps", long, "triton-inplace")
    if inplace:
        logits_bytes = long.N * long.T * long.V * torch.finfo(getattr(torch, long.dtype)).bits // 8
        share = inplace["peak_mb"] * 2**20 / logits_bytes
        lines += [
            f"- logits path, in place: {inplace['x_floor']:.2f}x its floor (target <= 1.2): {verdict(inplace['x_floor'] <= 1.2)}",
            f"- logits path, in place: {inplace['x_eager'] or 0:.1f}x faster than eager (target >= 5): "
            f"{verdict((inplace['x_eager'] or 0) >= 5)}",
            f"- logits path, in place: extra memory {share * 100:.2f} % of the logits (target <= 2 %): {verdict(share <= 0.02)}",
        ]
    else:
        lines.append("- logits path: not measured")
    for cfg, name in ((long, "N=8, T=4096, H=4096"), (liger_cfg, "Liger's DPO case")):
        ours = [r for r in (_find(rows, "linear_safedpo_loss", cfg, v) for v in ("ours-triton", "ours-torch")) if r]
        if not ours:
            lines.append(f"- fused-linear ({name}): not measured")
            continue
        best = min(ours, key=lambda r: r["median_s"])
        eff = best["floor_s"] / best["median_s"]
        lines.append(f"- fused-linear ({name}), {best['variant']}: {eff * 100:.0f} % of the measured bf16 matmul rate "
                     f"over the {'4' if cfg.ref_model else '3'}-matmul floor (target >= 60 %): {verdict(eff >= 0.6)}")
        for other in ("liger", "cce"):
            o = _find(rows, "linear_safedpo_loss", cfg, other)
            if o:
                lines.append(f"- fused-linear ({name}): {best['median_s'] * 1e3:.1f} ms vs {other} {o['median_s'] * 1e3:.1f} ms "
                             f"(target: faster): {verdict(best['median_s'] < o['median_s'])}")
        trl = _find(rows, "linear_safedpo_loss", cfg, "trl-head")
        stats = _find(rows, "linear_safedpo_loss", cfg, "ours-triton-stats")
        if trl and stats:  # the same work: log-probs and DPOTrainer's token statistics
            x = trl["median_s"] / stats["median_s"]
            lines.append(f"- fused-linear ({name}), with token statistics: {stats['median_s'] * 1e3:.1f} ms vs TRL's head "
                         f"{trl['median_s'] * 1e3:.1f} ms, {x:.2f}x (target >= 1.3x): {verdict(x >= 1.3)}; peak "
                         f"{stats['peak_mb']:.0f} MB vs {trl['peak_mb']:.0f} MB (target: not more): "
                         f"{verdict(stats['peak_mb'] <= trl['peak_mb'])}")
        cce = _find(rows, "linear_safedpo_loss", cfg, "cce")
        if cce:
            grad_w_mb = cfg.V * cfg.H * torch.finfo(getattr(torch, cfg.dtype)).bits // 8 / 2**20
            lines.append(f"- fused-linear ({name}): peak {best['peak_mb']:.0f} MB vs CCE {cce['peak_mb']:.0f} MB "
                         f"+ weight gradient {grad_w_mb:.0f} MB (target: not more): "
                         f"{verdict(best['peak_mb'] <= cce['peak_mb'] + grad_w_mb)}")
    if not dry:
        for variant, key in (("liger", "liger"), ("eager", "torch")):
            r = _find(rows, "linear_safedpo_loss", liger_cfg, variant)
            t, m = LIGER_PUBLISHED[key]
            if r:
                lines.append(f"- Liger's case, {variant} here: {r['median_s'] * 1e3:.1f} ms, "
                             f"total peak {r['total_peak_mb'] / 1024:.2f} GiB "
                             f"(Liger's published H100 figure for {key}: {t * 1e3:.1f} ms / {m / 1e9:.2f} GB)")
    return lines


def model_lines(rows: list, meta: dict, ceil: dict, dry: bool) -> list:
    """The issue model's prediction for the logits path in place (bench.issue_model, from the SASS of the
    kernels compiled for this card by this machine's triton) beside the time measured: its issue, MUFU
    and memory times (memory at the measured copy bandwidth) of the forward and the in-place backward, bf16,
    N=8, T=4096, V=128256. The dry run reads H100's SASS and has no measurement to compare."""
    from bench.issue_model import CARDS, SHAPE

    card = "H100" if dry else next((c for c in CARDS if c in meta["card"]), None)
    if card is None:
        return [f"- issue model: no figures for {meta['card']} (bench/issue_model.py CARDS)"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.json"
        res = subprocess.run([sys.executable, "-m", "bench.gpu_compile", "--model-card", card, "--json", str(path)],
                             env=env, capture_output=True, text=True, timeout=300)
        if not path.exists():
            return ["- issue model: failed: " + (res.stderr.strip().splitlines() or ["no output"])[-1][:200]]
        data = json.loads(path.read_text())
    elements = SHAPE["N"] * SHAPE["T"] * SHAPE["V"]
    parts, predicted = [], 0.0
    for kernel in ("forward", "backward, in place"):
        m = next(m for m in data["model"] if (m["kernel"], m["dtype"]) == (kernel, "bfloat16"))
        memory = elements * (2 if kernel == "forward" else 4) / ceil["bandwidth_Bps"]
        predicted += max(m["issue_s"], m["mufu_s"], memory)
        parts.append(f"{kernel}: issue {m['issue_s'] * 1e3:.2f} ms, MUFU {m['mufu_s'] * 1e3:.2f} ms, "
                     f"memory {memory * 1e3:.2f} ms")
    line = (f"- issue model (triton {data['triton']}, {card} SASS), logits path in place, bf16, N=8, T=4096, "
            f"V=128256: {'; '.join(parts)}; at least {predicted * 1e3:.2f} ms")
    measured = _find(rows, "sequence_logps", configs(dry)["long"], "triton-inplace")
    if measured and not dry:
        line += f"; measured {measured['median_s'] * 1e3:.2f} ms ({measured['median_s'] / predicted:.2f}x the prediction)"
    return [line]


def write(rows: list, meta: dict, ceil: dict, out: Path, dry: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    card = meta["card"].replace(" ", "-").replace("(", "").replace(")", "")
    stem = out / f"gpu-{card}-{datetime.date.today()}"
    fields = ["op", "variant", "settings", "N", "T", "V", "H", "dtype", "device", "ragged", "packed", "bias", "ref_model",
              "median_s", "min_s", "max_s", "first_s", "peak_mb", "total_peak_mb", "floor_s", "x_floor", "x_eager", "value",
              "deviation", "matches", "status"]
    write_csv(f"{stem}.csv", rows, fields)
    cells = []
    for r in rows:
        size = f"{cases.Config(**{k: r[k] for k in cases.Config.__dataclass_fields__}).label()}, {r['V']}, {r['H']}"
        if r.get("status") != "ok":
            cells.append([r["op"], size, r["variant"], r["settings"], r["status"]])
            continue
        cells.append([r["op"], size, r["variant"], r["settings"],
                      f"{r['median_s'] * 1e3:.1f} ({r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f})",
                      f"{r['x_eager']:.2f}" if r.get("x_eager") else "", f"{r['peak_mb']:.0f}", f"{r['total_peak_mb']:.0f}",
                      f"{r['x_floor']:.2f}", f"{r['deviation']:.1e}", r["matches"]])
    columns = ["op", "N x T, V, H", "variant", "settings", "median ms (min-max)", "x eager", "peak MB", "total peak MB",
               "x floor", "deviation from float32", "ok"]
    lines = [
        f"# GPU check: {meta['card']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta.get('cuda')}, driver {meta.get('driver', '-')}; "
        f"copy bandwidth {ceil['bandwidth_Bps'] / 1e9:.1f} GB/s, bf16 matmul {ceil['bf16_flops'] / 1e12:.1f} TFLOP/s.",
        "Forward + backward, median (min-max) of 3 after a warm-up; peak = max_memory_allocated above the inputs,",
        "total peak = max_memory_allocated with inputs and weights (the figure Liger publishes); floor = 3 passes",
        "over the logits / copy bandwidth (logits path) or 3 matmuls over the response tokens (4 with a reference",
        "model) / bf16 matmul rate (linear path). Short cases: 64 pairs of 64-128 tokens per side, padded (N x T with",
        "the tail ignored) or packed (cu_seqlens, no padding). logits-triton-inplace: the head's logits materialized",
        "by F.linear, then safedpo_loss with inplace_backward=True. trl-head: TRL's fused LM head as DPOTrainer calls",
        "it (with its token statistics); ours-triton-stats: ours with token_stats=True, the same work. settings:",
        "launcher environment overrides.",
        "",
        markdown_table(columns, cells),
        "",
        "## Targets",
        "",
        *targets(rows, dry),
        *model_lines(rows, meta, ceil, dry),
    ]
    table = "\n".join(lines) + "\n"
    Path(f"{stem}.md").write_text(table)
    Path(f"{stem}.json").write_text(json.dumps(dict(info=meta, ceilings=ceil), indent=1))
    print(table, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="cases that would start after this many seconds are skipped (keeps gpu_check.sh under 8 minutes)")
    a = p.parse_args()
    rows, _, _ = run(a.dry_run, Path(a.out), a.budget_s)
    bad = [r for r in rows if r.get("matches") == "NO"]
    if bad or (a.dry_run and any(r.get("status", "").startswith("failed") for r in rows)):
        raise SystemExit("gpu_bench: a case failed or does not match eager")


if __name__ == "__main__":
    main()
