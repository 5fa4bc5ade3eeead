"""Peak memory and time of sequence_logps forward + backward: fused backends versus the eager reference.

    python -m bench.logits_memory [--N 8 --T 1024 --V 32000 --dtype float32]

Each variant runs in a fresh process (peak RSS on the CPU, max_memory_allocated on CUDA) and reports its
peak memory increase above the resident logits, the median time over 3 runs after a warm-up, and its
error against the reference. The gradient is taken with torch.autograd.grad (as an upstream layer would
receive it), and it counts towards the peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

VARIANTS = {
    "eager": dict(),
    "torch": dict(backend="torch"),
    "torch-inplace": dict(backend="torch", inplace_backward=True),
    "native": dict(backend="native"),
    "native-inplace": dict(backend="native", inplace_backward=True),
    "triton": dict(backend="triton"),
    "triton-inplace": dict(backend="triton", inplace_backward=True),
}


def one(variant: str, N: int, T: int, V: int, dtype: str, device: str, repeats: int) -> dict:
    from bench.memory import PeakMemory
    from safedpo_kernels import reference, sequence_logps

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (N, T), generator=gen)
    labels[:, : T // 4] = -100  # a prompt
    labels = labels.to(device)
    dt = getattr(torch, dtype)

    def fresh_logits():
        return torch.randn(N, T, V, generator=torch.Generator().manual_seed(1)).to(dt).to(device).requires_grad_()

    def step(logits):
        if variant == "eager":
            out = reference.sequence_logps(logits, labels)
        else:
            out = sequence_logps(logits, labels, **VARIANTS[variant])
        (grad,) = torch.autograd.grad(out.sum(), logits)
        return out.detach(), grad

    times = []
    for i in range(repeats + 1):
        logits = fresh_logits()
        if device == "cuda":
            torch.cuda.synchronize()
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            out, grad = step(logits)
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
        if i == 0:
            peak = mem.peak_bytes  # the first (cold) run: nothing cached yet from earlier runs
        else:
            times.append(elapsed)
        del grad, logits
    want = reference.sequence_logps(fresh_logits().detach().double(), labels)
    err = ((out.double() - want).abs() / want.abs().clamp(min=1)).max().item()
    return dict(variant=variant, N=N, T=T, V=V, dtype=dtype, device=device, median_s=statistics.median(times),
                peak_bytes=peak, logits_bytes=N * T * V * torch.finfo(dt).bits // 8, max_err=err)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=8)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=None, help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.N, a.T, a.V, a.dtype, a.device, a.repeats)))
        return
    from bench.memory import run_isolated
    from safedpo_kernels.api import native_available

    names = a.variants.split(",") if a.variants else [
        v for v in VARIANTS
        if not (v.startswith("triton") and a.device != "cuda") and not (v.startswith("native") and not native_available())
    ]
    rows = []
    print(f"sequence_logps fwd+bwd, N={a.N} T={a.T} V={a.V} {a.dtype} on {a.device}")
    print(f"{'variant':16} {'median s':>9} {'peak MB':>9} {'x eager':>8} {'max err':>9}")
    for name in names:
        args = ["--one", name, "--N", str(a.N), "--T", str(a.T), "--V", str(a.V), "--dtype", a.dtype,
                "--device", a.device, "--repeats", str(a.repeats)]
        r = run_isolated("bench.logits_memory", *args)
        rows.append(r)
        base = rows[0]["peak_bytes"] if rows[0]["variant"] == "eager" else float("nan")
        print(f"{name:16} {r['median_s']:9.3f} {r['peak_bytes'] / 2**20:9.1f} {r['peak_bytes'] / base:8.3f} {r['max_err']:9.2e}", flush=True)


if __name__ == "__main__":
    main()
