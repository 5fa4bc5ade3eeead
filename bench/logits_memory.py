"""sequence_logps forward + backward: fused backends versus eager PyTorch and torch.compile.

    python -m bench.logits_memory [--N 8 --T 1024 --V 32000 --dtype float32 --repeats 5]

Each variant runs in a fresh process and reports the median time over ``repeats`` runs after a warm-up
(the warm-up time, which includes torch.compile's compilation, is reported apart), the peak memory
increase above the resident logits (RSS high-water mark on the CPU, max_memory_allocated on CUDA) and
its error against the float64 reference. The gradient is taken with torch.autograd.grad, as an upstream
layer would receive it, and counts towards the peak. A quarter of each row's tokens are prompt
(ignored).
"""

from __future__ import annotations

import argparse
import json

import torch

VARIANTS = {
    "eager": None,
    "compile": None,
    "torch": dict(backend="torch"),
    "torch-inplace": dict(backend="torch", inplace_backward=True),
    "native": dict(backend="native"),
    "native-inplace": dict(backend="native", inplace_backward=True),
    "triton": dict(backend="triton"),
    "triton-inplace": dict(backend="triton", inplace_backward=True),
}


def one(variant: str, N: int, T: int, V: int, dtype: str, device: str, repeats: int) -> dict:
    from bench.harness import measure
    from safedpo_kernels import reference, sequence_logps

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (N, T), generator=gen)
    labels[:, : T // 4] = -100
    labels = labels.to(device)
    dt = getattr(torch, dtype)

    if variant == "eager":
        fn = reference.sequence_logps
    elif variant == "compile":
        fn = torch.compile(reference.sequence_logps)
    else:
        def fn(logits, labels):
            return sequence_logps(logits, labels, **VARIANTS[variant])

    def make_inputs():
        logits = torch.randn(N, T, V, generator=torch.Generator().manual_seed(1)).to(dt).to(device)
        return (logits.requires_grad_(),)

    def step(logits):
        out = fn(logits, labels)
        (grad,) = torch.autograd.grad(out.sum(), logits)
        del grad
        return out.detach()

    r = measure(make_inputs, step, device, repeats)
    want = reference.sequence_logps(make_inputs()[0].detach().double(), labels)
    got = step(*make_inputs())
    r.update(variant=variant, N=N, T=T, V=V, dtype=dtype, device=device,
             max_err=((got.double() - want).abs() / want.abs().clamp(min=1)).max().item())
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=8)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
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
    print(f"sequence_logps fwd+bwd, N={a.N} T={a.T} V={a.V} {a.dtype} on {a.device}, median of {a.repeats} after a warm-up")
    print(f"{'variant':16} {'median s':>9} {'x faster':>9} {'warm-up s':>10} {'peak MB':>9} {'x eager':>8} {'max err':>9}")
    base = None
    for name in names:
        args = ["--one", name] + [f"--{k}={getattr(a, k)}" for k in ("N", "T", "V", "dtype", "device", "repeats")]
        r = run_isolated("bench.logits_memory", *args)
        base = base or r
        print(f"{name:16} {r['median_s']:9.3f} {base['median_s'] / r['median_s']:9.2f} {r['first_s']:10.2f} "
              f"{r['peak_bytes'] / 2**20:9.1f} {r['peak_bytes'] / base['peak_bytes']:8.3f} {r['max_err']:9.2e}", flush=True)


if __name__ == "__main__":
    main()
