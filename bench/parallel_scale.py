"""Vocabulary-parallel SafeDPO at scale: memory per rank and bytes communicated, ours against gathering
the logits first (what a tensor-parallel user must do with a loss that needs the whole vocabulary).

    python -m bench.parallel_scale [--ranks 2] [--out bench/results]

Measured: ``--ranks`` gloo processes on this CPU, small shapes, float32: each rank's peak of live tensor
bytes of the loss and its backward (torch.profiler's allocation events: deterministic) -- its logits
shard, what it allocates, and the hidden states' gradient, not the LM head's weight shard and its
gradient, which every way holds -- the bytes it passes to collectives, and the loss against the
single-process float64 reference. Computed: the same
quantities for a Llama-3-70B-like head (V = 128256, H = 8192, one pair of 8192-token sequences, bf16,
tensor parallel 8) from the formulas below, which the measured rows check (the script fails when a
measured byte count differs from its formula).

Per rank, with n tokens, p ranks, b bytes per logit:
- gather + eager: the shard (n V/p b), the gathered pieces and their concatenation (2 n V b) and the
  float32 log-softmax and its gradient of eager PyTorch (2 x 4 n V); all-gather of n V b bytes.
- gather + fused: the shard, the pieces and the gathered logits; our single-rank kernels add nothing
  (in-place backward).
- vocab-parallel logits (ours): the shard only; 3 float32 per token all-reduced (MAX of the shard's
  log-sum-exp; SUM of its exp-sum and of the target logit).
- vocab-parallel linear (ours): no logits but one chunk of float32 logits at a time
  (SAFEDPO_LINEAR_CHUNK_BYTES, 4 GiB on CUDA), and d hidden (n x H float32) all-reduced:
  the same all-reduce every tensor-parallel LM head's backward needs (Megatron's too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path

import torch

GIB = 2**30
BIG = dict(V=128256, H=8192, tokens=2 * 8192, p=8, b=2, chunk=4 * GIB)
SMALL = [dict(N=2, T=256, V=32000, H=256), dict(N=2, T=1024, V=32000, H=256)]
VOCAB_FLOATS = 3  # per token: max, sum of exponentials, target logit


def formulas(n: int, V: int, H: int, p: int, b: int, chunk: int, counted: int) -> dict:
    """(memory per rank, bytes each rank passes to collectives) of each way, in bytes; ``counted``: the
    tokens whose label is not ignored (the linear path gathers only those rows)."""
    shard = n * V // p * b
    full = n * V * b
    return {
        "gather + eager": (shard + 2 * full + 2 * 4 * n * V, full),
        "gather + fused": (shard + 2 * full, full),
        "vocab-parallel logits (ours)": (shard, VOCAB_FLOATS * 4 * n),
        "vocab-parallel linear (ours)": (min(chunk, 4 * counted * V // p) + 4 * n * H,
                                         VOCAB_FLOATS * 4 * counted + 4 * n * H),
    }


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    rows = [dict(shape, results=_measure(rank, world, **shape)) for shape in SMALL]
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def _measure(rank: int, world: int, N: int, T: int, V: int, H: int) -> dict:
    """{way: peak bytes, bytes communicated, relative loss error} of one shape on this rank."""
    import torch.distributed as dist

    from bench.memory import AllReducedBytes, profiled_peak_bytes
    from safedpo_kernels import linear_safedpo_loss, reference, safedpo_loss

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    labels = torch.randint(0, V, (N, T), generator=gen)
    labels[:, : T // 4] = -100
    ref = torch.randn(N, generator=gen)
    cs, rs = torch.tensor([True]), torch.tensor([False])
    width = V // world
    logits = hidden @ weight.t()
    want = float(reference.safedpo_loss(logits.double(), labels, ref.double(), cs, rs).loss)
    shard = logits[..., rank * width:(rank + 1) * width].contiguous()
    del logits
    x = shard.clone().requires_grad_()
    h = hidden.clone().requires_grad_()
    w = weight[rank * width:(rank + 1) * width].clone().requires_grad_()

    gathered = [0]  # bytes of all_gather (not counted by AllReducedBytes)

    def gather(fused: bool):
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard)
        gathered[0] += N * T * V * shard.element_size()  # the gathered tensor: the convention of the formulas
        full = torch.cat(parts, -1).requires_grad_()
        del parts
        if fused:
            out = safedpo_loss(full, labels, ref, cs, rs, inplace_backward=True)
        else:
            out = reference.safedpo_loss(full, labels, ref, cs, rs)
        out.loss.backward()
        return out.loss.item()

    def vocab_logits():
        out = safedpo_loss(x, labels, ref, cs, rs, inplace_backward=True, vocab_group=dist.group.WORLD, validate=False)
        out.loss.backward()
        return out.loss.item()

    def vocab_linear():
        out = linear_safedpo_loss(h, w, labels, ref, cs, rs, vocab_group=dist.group.WORLD, validate=False)
        out.loss.backward()
        return out.loss.item()

    # The logits shard is an activation of each logits way; the head's gradient is not counted (every way has one).
    ways = {"gather + eager": (lambda: gather(False), shard.numel() * 4),
            "gather + fused": (lambda: gather(True), shard.numel() * 4),
            "vocab-parallel logits (ours)": (vocab_logits, shard.numel() * 4),
            "vocab-parallel linear (ours)": (vocab_linear, -w.numel() * 4)}
    results = {}
    for name, (fn, extra) in ways.items():
        loss = []
        gathered[0] = 0
        with AllReducedBytes() as sent:
            peak = profiled_peak_bytes(lambda fn=fn, loss=loss: loss.append(fn()))
        results[name] = dict(peak=peak + extra, bytes=sent.bytes + gathered[0],
                             err=abs(loss[0] - want) / max(1.0, abs(want)))
    return results


def fmt(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args.ranks, os.path.join(tmp, "init"), os.path.join(tmp, "rows.json")),
                 nprocs=args.ranks, join=True)
        rows = json.loads(Path(tmp, "rows.json").read_text())

    lines = [f"# Vocabulary-parallel SafeDPO: memory per rank and bytes communicated ({datetime.date.today()})", "",
             f"Measured on {args.ranks} gloo processes of this CPU (float32, one pair, a quarter of each sequence "
             "prompt), `python -m bench.parallel_scale`: peak live tensor bytes per rank while the loss and its backward "
             "run, inputs included (torch.profiler allocation events), and bytes passed to collectives per rank "
             "(all-gather: the gathered tensor). Computed rows use the formulas in bench/parallel_scale.py, which "
             "the measured byte counts match exactly; the linear path's memory formula counts its chunk of logits and d "
             "hidden only, a floor (its measured peak adds the chunk's bookkeeping and the head gradient formed in the "
             "forward before it is scaled).", ""]
    lines += ["| shape | way | memory per rank | communicated per rank | formula: memory, bytes | loss error |",
              "|---|---|---|---|---|---|"]
    for row in rows:
        n = row["N"] * row["T"]
        expect = formulas(n, row["V"], row["H"], args.ranks, 4, 512 * 2**20, n - n // 4)
        for name, r in row["results"].items():
            mem, sent = expect[name]
            if r["bytes"] != sent:
                raise SystemExit(f"{name} at {row}: measured {r['bytes']} bytes communicated, the formula says {sent}")
            lines.append(f"| {row['N']} x {row['T']}, V={row['V']}, H={row['H']}, p={args.ranks} | {name} | "
                         f"{fmt(r['peak'])} | {fmt(r['bytes'])} | {fmt(mem)}, {fmt(sent)} | {r['err']:.1e} |")
    big = BIG
    lines += ["", f"Computed: Llama-3-70B-like head, V={big['V']}, H={big['H']}, one pair of 8192-token sequences "
              f"({big['tokens']} tokens, all counted: the most), bf16, tensor parallel {big['p']}, per rank:", "",
              "| way | memory per rank | communicated per rank | vs gather + eager |", "|---|---|---|---|"]
    table = formulas(big["tokens"], big["V"], big["H"], big["p"], big["b"], big["chunk"], big["tokens"])
    base_mem, base_sent = table["gather + eager"]
    for name, (mem, sent) in table.items():
        lines.append(f"| {name} | {fmt(mem)} | {fmt(sent)} | memory {mem / base_mem:.3f}x, bytes {sent / base_sent:.2e}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) / f"parallel-scale-{datetime.date.today()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
