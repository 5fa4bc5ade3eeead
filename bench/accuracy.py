"""Largest errors against the float64 reference, per backend and logits dtype (the metrics of the numerical contract).

    TRITON_INTERPRET=1 python -m bench.accuracy [--trials 5]

For each backend available here and each dtype: safedpo_loss forward + backward on fresh random inputs
(odd sizes, masked prompts, a fully masked row, all four safety combinations), reporting the max over
trials of the scaled output error (max |x - ref| / max(|ref|, 1), over the per-sequence log-probs and the
loss) and of the gradient's relative error ||g - g_ref|| / ||g_ref||.
"""

from __future__ import annotations

import argparse

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=5)
    a = p.parse_args()
    from safedpo_kernels import available_backends, reference, safedpo_loss, sequence_logps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = available_backends(device)
    print(f"{'backend':8} {'dtype':9} {'logps/loss err':>15} {'grad rel err':>13}")
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            worst_out = worst_grad = 0.0
            for trial in range(a.trials):
                g = torch.Generator().manual_seed(trial)
                B, T, V = 4, 37, 1531
                logits = (torch.randn(2 * B, T, V, generator=g) * 4).to(dtype).to(device)
                labels = torch.randint(0, V, (2 * B, T), generator=g)
                labels[:, : int(torch.randint(1, 9, (1,), generator=g))] = -100
                labels[1] = -100
                labels = labels.to(device)
                noise = torch.randn(2 * B, generator=g).to(device) * 2
                ref_logps = (reference.sequence_logps(logits.double(), labels) + noise).float()
                cs = torch.tensor([1, 1, 0, 0], dtype=torch.bool, device=device)
                rs = torch.tensor([1, 0, 1, 0], dtype=torch.bool, device=device)
                x = logits.clone().requires_grad_()
                out = safedpo_loss(x, labels, ref_logps, cs, rs, beta=0.5, delta=2.0, backend=backend)
                out.loss.backward()
                seq = sequence_logps(logits, labels, backend=backend)
                xr = logits.double().requires_grad_()
                want = reference.safedpo_loss(xr, labels, ref_logps.double(), cs, rs, beta=0.5, delta=2.0)
                want.loss.backward()
                want_seq = reference.sequence_logps(logits.double(), labels)
                for got_v, want_v in ((seq, want_seq), (out.loss, want.loss)):
                    err = ((got_v.double() - want_v).abs() / want_v.abs().clamp(min=1)).max().item()
                    worst_out = max(worst_out, err)
                worst_grad = max(worst_grad, ((x.grad.double() - xr.grad).norm() / xr.grad.norm()).item())
            print(f"{backend:8} {str(dtype)[6:]:9} {worst_out:15.2e} {worst_grad:13.2e}", flush=True)


if __name__ == "__main__":
    main()
