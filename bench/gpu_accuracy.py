"""Realistic-vocabulary correctness on the GPU: every backend against float64, at the sizes models have.

    python -m bench.gpu_accuracy --out DIR            # on a CUDA machine (part of bench/gpu_check.sh)
    python -m bench.gpu_accuracy --dry-run --out DIR  # tiny sizes on the CPU (Triton interpreter)

Vocabularies 128256 (Llama 3) and 151936 (Qwen2), bf16, 2 pairs of 2048 tokens (a quarter prompt,
one row with 300 padding tokens; pair 0 safe vs unsafe, pair 1 unsafe vs safe, so the safety
transform swaps it), H = 4096 for the fused-linear path. For each backend usable on the device:
safedpo_loss on the logits (plain and in-place backward) and linear_safedpo_loss on hidden states and
head, forward + backward, against the float64 reference computed from the same bf16 inputs over all
rows. Checked with SPEC's bf16 contract: sequence log-probs and loss within 1e-4 (max |x - ref| /
max(|ref|, 1)), gradients within 1e-2 (||g - g_ref|| / ||g_ref||). Exit status 1 when one misses.
"""

from __future__ import annotations

import argparse
import datetime
import gc
from pathlib import Path

import torch

OUT_TOL, GRAD_TOL = 1e-4, 1e-2
BETA, DELTA = 0.1, 10.0


def scaled_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def inputs(V: int, T: int, H: int, device: str, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    N = 4
    labels = torch.randint(0, V, (N, T), generator=g, device=device)
    labels[:, : T // 4] = -100
    labels[3, T - min(300, T // 4):] = -100
    ref_logps = -torch.rand(N, generator=g, device=device) * T * 2
    chosen_safe = torch.tensor([True, False], device=device)
    rejected_safe = torch.tensor([False, True], device=device)
    logits = (torch.randn(N, T, V, generator=g, device=device) * 3).to(torch.bfloat16)
    hidden = torch.randn(N, T, H, generator=g, device=device).to(torch.bfloat16)
    weight = (torch.randn(V, H, generator=g, device=device) * (4 / H**0.5)).to(torch.bfloat16)
    return labels, ref_logps, chosen_safe, rejected_safe, logits, hidden, weight


def outputs(out) -> list:
    """(name, tensor) of what the contract bounds: the loss and the sequence log-probs (after T)."""
    return [("loss", out.loss.detach()), ("chosen_logps", out.chosen_logps), ("rejected_logps", out.rejected_logps)]


def check(name: str, got_out, want_out, grads: list, lines: list) -> bool:
    ok = True
    worst_out = max(scaled_err(g, w) for (_, g), (_, w) in zip(outputs(got_out), outputs(want_out)))
    ok &= worst_out <= OUT_TOL
    parts = [f"outputs {worst_out:.1e}"]
    for gname, got, want in grads:
        e = rel_err(got, want)
        ok &= e <= GRAD_TOL
        parts.append(f"d {gname} {e:.1e}")
    lines.append(f"{name}: {', '.join(parts)} -> {'ok' if ok else 'FAILED'}")
    print(lines[-1], flush=True)
    return ok


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_vocab(V: int, T: int, H: int, device: str, lines: list) -> bool:
    from safedpo_kernels import available_backends, linear_safedpo_loss, reference, safedpo_loss

    backends = [b for b in available_backends(device) if b != "native"] if device == "cuda" else ["triton", "torch"]
    labels, ref, cs, rs, logits, hidden, weight = inputs(V, T, H, device, seed=V)
    ok = True

    # Logits path: the float64 oracle over all rows, then each backend.
    x64 = logits.double().requires_grad_()
    want = reference.safedpo_loss(x64, labels, ref.double(), cs, rs, beta=BETA, delta=DELTA)
    want.loss.backward()
    want_grad = x64.grad
    del x64
    free(device)
    for backend in backends:
        for inplace in (False, True):
            x = logits.clone().requires_grad_()
            out = safedpo_loss(x, labels, ref, cs, rs, beta=BETA, delta=DELTA, backend=backend, inplace_backward=inplace)
            out.loss.backward()
            tag = " in-place" if inplace else ""
            ok &= check(f"V={V} safedpo_loss {backend}{tag}", out, want, [("logits", x.grad, want_grad)], lines)
            del x, out
            free(device)
    del want, want_grad
    free(device)

    # Fused-linear path: hidden (N, T, H) and weight (V, H); float64 logits formed once for the oracle.
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    want = reference.safedpo_loss(h64 @ w64.t(), labels, ref.double(), cs, rs, beta=BETA, delta=DELTA)
    want.loss.backward()
    want_h, want_w = h64.grad, w64.grad
    del h64, w64
    free(device)
    for backend in backends:
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        out = linear_safedpo_loss(h, w, labels, ref, cs, rs, beta=BETA, delta=DELTA, backend=backend)
        out.loss.backward()
        ok &= check(f"V={V} linear_safedpo_loss {backend}", out, want,
                    [("hidden", h.grad, want_h), ("weight", w.grad, want_w)], lines)
        del h, w, out
        free(device)
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args()
    device = "cpu" if a.dry_run else "cuda"
    if a.dry_run:
        sizes, T, H = (1000, 1531), 64, 64
    else:
        sizes, T, H = (128256, 151936), 2048, 4096
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    lines = [f"# Correctness against float64 at real vocabularies: {card}", "",
             f"torch {torch.__version__}; bf16, 2 pairs x {T} tokens, H = {H}; bounds: outputs {OUT_TOL:g}, "
             f"gradients {GRAD_TOL:g}", ""]
    ok = True
    for V in sizes:
        ok &= run_vocab(V, T, H, device, lines)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = card.replace(" ", "-").replace("(", "").replace(")", "")
    (out / f"gpu-accuracy-{slug}-{datetime.date.today()}.txt").write_text("\n".join(lines) + "\n")
    if not ok:
        raise SystemExit("gpu_accuracy: a case missed the numerical contract")


if __name__ == "__main__":
    main()
