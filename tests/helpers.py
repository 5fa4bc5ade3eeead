"""Helpers of the kernel tests: error measures, the contract's tolerances, the sequence_logps run and
its float64 oracle, random inputs (odd sizes, masked prompts, padding, a fully ignored row, all four
safety combinations) and packing; and the versions requirements-lock.txt pins."""

from pathlib import Path

import torch

from safedpo_kernels import reference, sequence_logps


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (0 when both are 0)."""
    got, want = got.double(), want.double()
    denom = want.norm().item()
    diff = (got - want).norm().item()
    return diff / denom if denom else diff


def max_scaled_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max_i |got_i - want_i| / max(|want_i|, 1): relative for large values, absolute near 0."""
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()


# (outputs, gradients) tolerances per logits dtype, against float64: relative 1e-5 for float32; bf16/fp16
# outputs (accumulated in float32) 1e-4, their gradients (stored in bf16/fp16) 1e-2.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-4, 1e-2),
    torch.float16: (1e-4, 1e-2),
}


def logps_and_grad(logits, labels, upstream, **kw):
    """sequence_logps on a fresh leaf copy of logits, then backward of (out * upstream).sum():
    (out, d/d logits). Keywords go to sequence_logps."""
    x = logits.detach().clone().requires_grad_()
    out = sequence_logps(x, labels, **kw)
    (out * upstream).sum().backward()
    return out.detach(), x.grad


def float64_logps_and_grad(logits, labels, upstream, **kw):
    """The same from the float64 reference: the oracle of ``logps_and_grad``."""
    x = logits.detach().double().requires_grad_()
    out = reference.sequence_logps(x, labels, **kw)
    (out * upstream.double()).sum().backward()
    return out.detach(), x.grad


def make_logits(shape, dtype, device, gen, scale=3.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def make_labels(N, T, V, gen, device, prompt_max=3):
    """Random targets; a random-length prompt and random-length padding are ignored (-100), and row 1
    is fully ignored, as a fully truncated response would be."""
    labels = torch.randint(0, V, (N, T), generator=gen)
    for n in range(N):
        p = int(torch.randint(0, prompt_max + 1, (1,), generator=gen))
        pad = int(torch.randint(0, 3, (1,), generator=gen))
        labels[n, :p] = -100
        if pad:
            labels[n, T - pad :] = -100
    if N > 1:
        labels[1] = -100
    return labels.to(device)


def make_flags(B, gen, device):
    """(chosen_safe, rejected_safe): the first four pairs cover all four combinations."""
    base = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=torch.bool)
    flags = torch.randint(0, 2, (B, 2), generator=gen).bool()
    flags[: min(B, 4)] = base[: min(B, 4)]
    return flags[:, 0].to(device), flags[:, 1].to(device)


def pack(logits, labels, keep_lengths):
    """Padded (N, T, V) -> packed (total, V) keeping the first keep_lengths[n] tokens of each row."""
    cu = [0]
    for n_len in keep_lengths:
        cu.append(cu[-1] + n_len)
    packed = torch.cat([logits[n, :L] for n, L in enumerate(keep_lengths)])
    packed_labels = torch.cat([labels[n, :L] for n, L in enumerate(keep_lengths)])
    return packed, packed_labels, torch.tensor(cu, dtype=torch.int32, device=logits.device)


def random_case(N, T, V, dtype, device, seed, extra_positions=0):
    """(logits (N, T + extra_positions, V), labels (N, T) with prompts, padding and an ignored row,
    upstream (N,)): a fresh random sequence_logps case, seeded."""
    gen = torch.Generator().manual_seed(seed)
    logits = make_logits((N, T + extra_positions, V), dtype, device, gen)
    labels = make_labels(N, T, V, gen, device)
    return logits, labels, torch.randn(N, generator=gen).to(device)



LOCK = Path(__file__).resolve().parent.parent / "requirements-lock.txt"


def locked_versions() -> dict:
    """{canonical package name: version} of requirements-lock.txt (make test's set-up installs these)."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{LOCK.name}: {line!r} is not name==version"
            assert canonicalize_name(name) not in pins, f"{LOCK.name}: {name} pinned twice"
            pins[canonicalize_name(name)] = version
    return pins


def check_stats(got, want: tuple, dtype) -> None:
    """A TokenStats against the float64 oracle's (reference.token_stats) within the contract's output
    tolerance; counts exactly."""
    from safedpo_kernels import TokenStats

    assert isinstance(got, TokenStats)
    assert got.entropy.dtype == got.mean_logit.dtype == torch.float32
    assert got.top1.dtype == got.tokens.dtype == torch.int64
    tol = TOL[dtype][0]
    assert max_scaled_err(got.entropy, want[0]) <= tol
    finite = torch.isfinite(want[1]).cpu()  # a -inf logit makes its row's mean logit -inf
    assert torch.equal(got.mean_logit.cpu()[~finite], want[1].float().cpu()[~finite])
    assert max_scaled_err(got.mean_logit.cpu()[finite], want[1].cpu()[finite]) <= tol
    assert torch.equal(got.top1.cpu(), want[2].round().long().cpu())
    assert torch.equal(got.tokens.cpu(), want[3].round().long().cpu())
    assert not any(t.requires_grad for t in got)


def tied_case(N, T, V, dtype, device, seed):
    """Random logits with ties at the top: some labels share the row maximum with an earlier column (not
    top-1), some with a later one (top-1); a -inf logit in one row."""
    gen = torch.Generator().manual_seed(seed)
    logits = make_logits((N, T, V), torch.float32, "cpu", gen)
    labels = make_labels(N, T, V, gen, "cpu")
    for n in range(N):
        for t in range(T):
            y = int(labels[n, t])
            if y < 0:
                continue
            kind = (n * T + t) % 4
            top = float(logits[n, t].max()) + 1.0
            if kind == 0:  # the label is the unique maximum
                logits[n, t, y] = top
            elif kind == 1 and y > 0:  # tied with an earlier column: argmax is that column
                logits[n, t, y] = logits[n, t, y - 1] = top
            elif kind == 2 and y < V - 1:  # tied with a later column: the label is the first maximum
                logits[n, t, y] = logits[n, t, y + 1] = top
    logits[0, -1, 3] = float("-inf")
    return logits.to(dtype).to(device), labels.to(device)


def same_outputs(a, b) -> bool:
    """Bitwise equality of two SafeDPOOutputs, field by field (fields that are None, such as token_stats
    when it is off, must be None in both)."""
    return len(a) == len(b) and all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                                    for x, y in zip(a, b))
