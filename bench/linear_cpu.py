"""linear_safedpo_loss versus eager and Liger-Kernel, forward + backward (issue #3's benchmark).

    python -m bench.linear_cpu [--N 8 --T 1024 --H 256 --V 32000 --dtype float32 --repeats 3]

Each variant runs in a fresh process: median time over ``repeats`` runs after a warm-up, and the peak
memory increase (RSS high-water mark on the CPU, max_memory_allocated on CUDA) above the inputs.
All variants compute the same loss (every pair safe/safe, so SafeDPO reduces to DPO, with zero reference
log-probs as Liger's ``use_ref_model=False``), and each checks its loss against eager's.

- eager: logits = hidden @ weight.T materialized, then the plain reference (log_softmax, gather, sum).
- ours-<backend>: linear_safedpo_loss.
- liger: liger_kernel.chunked_loss.LigerFusedLinearDPOLoss (its default: torch.compile'd chunks).
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import torch


def variant_step(name: str, beta: float):
    if name == "eager":
        from safedpo_kernels import reference

        def step(hidden, weight, labels, ref, cs, rs):
            out = reference.safedpo_loss(hidden @ weight.t(), labels, ref, cs, rs, beta=beta)
            out.loss.backward()
            return out.loss

    elif name.startswith("ours"):
        from safedpo_kernels import linear_safedpo_loss

        backend = name.split("-", 1)[1]

        def step(hidden, weight, labels, ref, cs, rs):
            out = linear_safedpo_loss(hidden, weight, labels, ref, cs, rs, beta=beta, backend=backend)
            out.loss.backward()
            return out.loss

    elif name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        fn = LigerFusedLinearDPOLoss(beta=beta, use_ref_model=False)

        def step(hidden, weight, labels, ref, cs, rs):
            out = fn(weight, hidden, labels)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            return loss

    else:
        raise ValueError(name)
    return step


def one(name, N, T, H, V, dtype, device, repeats):
    from bench.harness import measure

    dt = getattr(torch, dtype)

    def make_inputs():
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(N, T, H, generator=g).to(dt).to(device).requires_grad_()
        weight = (torch.randn(V, H, generator=g) / H**0.5).to(dt).to(device).requires_grad_()
        labels = torch.randint(0, V, (N, T), generator=g)
        labels[:, : T // 4] = -100  # prompt tokens
        labels = labels.to(device)
        ref = torch.zeros(N, device=device)
        safe = torch.ones(N // 2, dtype=torch.bool, device=device)
        return hidden, weight, labels, ref, safe, safe

    r = measure(make_inputs, variant_step(name, 0.1), device, repeats)
    r.update(variant=name, N=N, T=T, H=H, V=V, dtype=dtype, device=device)
    return r


def available_variants(device: str):
    names = ["eager", "ours-torch"]
    from safedpo_kernels.api import native_available

    if device == "cpu" and native_available():
        names.append("ours-native")
    if device == "cuda":
        names.append("ours-triton")
    if importlib.util.find_spec("liger_kernel") is not None:
        names.append("liger")
    return names


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
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.N, a.T, a.H, a.V, a.dtype, a.device, a.repeats)))
        return
    from bench.memory import run_isolated

    names = a.variants.split(",") if a.variants else available_variants(a.device)
    print(f"linear_safedpo_loss fwd+bwd, N={a.N} T={a.T} H={a.H} V={a.V} {a.dtype} on {a.device}, median of {a.repeats}")
    print(f"{'variant':12} {'median s':>9} {'x eager':>8} {'peak MB':>9} {'x eager':>8} {'loss':>12} {'ok':>3}")
    base = None
    for name in names:
        args = ["--one", name] + [f"--{k}={getattr(a, k)}" for k in ("N", "T", "H", "V", "dtype", "device", "repeats")]
        r = run_isolated("bench.linear_cpu", *args)
        base = base or r
        ok = abs(r["value"] - base["value"]) <= 1e-4 * max(1.0, abs(base["value"]))
        print(f"{name:12} {r['median_s']:9.3f} {r['median_s'] / base['median_s']:8.2f} {r['peak_bytes'] / 2**20:9.1f} "
              f"{r['peak_bytes'] / base['peak_bytes']:8.3f} {r['value']:12.6f} {'yes' if ok else 'NO':>3}", flush=True)


if __name__ == "__main__":
    main()
