"""Benchmark cases: one op, one variant (implementation), one size. Shared by the CPU suite, the GPU
check and the issue scripts.

``build(op, variant, cfg)`` returns ``(make_inputs, step)``: ``make_inputs()`` makes fresh inputs,
``step(*inputs)`` runs forward + backward and returns a scalar tensor (the loss, or the sum of the
sequence log-probs) that the suite compares with the eager variant's.

Every loss case uses pairs whose responses are all safe and zero reference log-probs, so that SafeDPO,
DPO and the other libraries' DPO losses compute the same number (T and the margin are O(B) work).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

import torch

OPS = ("sequence_logps", "safedpo_loss", "linear_safedpo_loss")
BETA = 0.1


@dataclass
class Config:
    """N sequences of up to T tokens (a quarter of each is prompt), vocabulary V, hidden size H.

    ragged: sequence n holds lengths()[n] tokens (between T/2 and T, seeded) instead of T; padded
    inputs are then (N, T) with the tail ignored, as a padded training batch is. packed: the sequences
    are concatenated without padding, (total, V) or (total, H) with cu_seqlens (flash-attention's varlen
    layout).
    """

    N: int
    T: int
    V: int
    H: int = 256
    dtype: str = "float32"
    device: str = "cpu"
    ragged: bool = False
    packed: bool = False

    def as_dict(self):
        return asdict(self)

    def lengths(self) -> list:
        if not self.ragged:
            return [self.T] * self.N
        g = torch.Generator().manual_seed(1)
        return torch.randint(self.T // 2, self.T + 1, (self.N,), generator=g).tolist()

    def tokens(self) -> int:
        """Token rows the logits hold: N x T padded, the sum of the lengths packed."""
        return sum(self.lengths()) if self.packed else self.N * self.T

    def label(self) -> str:
        layout = "packed" if self.packed else ("padded" if self.ragged else "")
        return f"{self.N} x {self.T}" + (f" {layout}" if layout else "")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def variants(op: str, device: str) -> list:
    """The variants that can run here, eager first."""
    from safedpo_kernels import available_backends

    # The Triton interpreter (CPU tensors under TRITON_INTERPRET=1) checks math; it is not timed.
    backends = [b for b in available_backends(device) if not (b == "triton" and device == "cpu")]
    ours = [v for b in backends for v in (b, f"{b}-inplace")]
    if op == "sequence_logps":
        return ["eager", "compile", "trl"] + ours
    if op == "safedpo_loss":
        return ["eager"] + [v for v in ours if v.endswith("inplace")]
    linear = ["eager"] + [f"ours-{v}" for v in ours if not v.endswith("inplace")]
    if _has("liger_kernel"):
        linear.append("liger")
    if _has("cut_cross_entropy"):
        linear.append("cce")
    return linear


# Variants with no packed (cu_seqlens) form: the TRL-style loop and Liger's DPO loss take (N, T) batches;
# torch.compile of the reference would recompile on every cu_seqlens.
PADDED_ONLY = ("trl", "liger", "compile")


def trl_style_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The memory-saving eager idiom of TRL-style trainers: gather the target logits, then take each
    sequence's log-sum-exp one sequence at a time, so only one sequence's float32 temporaries exist."""
    counted = labels != -100
    index = labels.clamp(min=0).unsqueeze(-1)
    per_token = []
    for row_logits, row_index in zip(logits, index):
        row = row_logits.float()
        per_token.append(row.gather(-1, row_index).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return (torch.stack(per_token) * counted).sum(-1)


def _fused_variant(variant: str):
    """"torch", "native-inplace", ... -> (backend, inplace_backward); anything else is an error (a typo
    such as "torch-compile" must not silently run another variant)."""
    backend, _, suffix = variant.partition("-")
    if suffix not in ("", "inplace"):
        raise ValueError(f"unknown variant {variant!r}")
    return backend, suffix == "inplace"


def _labels(cfg: Config, g: torch.Generator):
    """(labels, cu_seqlens): (N, T) and None padded, (total,) and int32 (N + 1,) packed; a quarter of
    each sequence is prompt (-100), and padding past a ragged sequence's length too."""
    labels = torch.randint(0, cfg.V, (cfg.N, cfg.T), generator=g, device=cfg.device)
    lengths = cfg.lengths()
    for n, L in enumerate(lengths):
        labels[n, : L // 4] = -100
        labels[n, L:] = -100
    if not cfg.packed:
        return labels, None
    cu = torch.tensor([0] + lengths, device=cfg.device).cumsum(0).to(torch.int32)
    return torch.cat([labels[n, :L] for n, L in enumerate(lengths)]), cu


def _rows(cfg: Config, last: int, g: torch.Generator, dt):
    """Random (N, T, last) or packed (total, last) inputs."""
    shape = (cfg.tokens(), last) if cfg.packed else (cfg.N, cfg.T, last)
    return torch.randn(*shape, generator=g, device=cfg.device, dtype=dt)


def _logits_inputs(cfg: Config):
    dt = getattr(torch, cfg.dtype)

    def make_inputs():
        # Generated on the device, in the target dtype: a GPU case's 4e9 logits are not made on the host.
        g = torch.Generator(device=cfg.device).manual_seed(0)
        labels, cu = _labels(cfg, g)
        logits = _rows(cfg, cfg.V, g, dt).requires_grad_()
        return logits, labels, cu

    return make_inputs


def _pair_extras(cfg: Config):
    ref = torch.zeros(cfg.N, device=cfg.device)
    safe = torch.ones(cfg.N // 2, dtype=torch.bool, device=cfg.device)
    return ref, safe, safe


def _seq_logps_step(variant: str):
    from safedpo_kernels import reference, sequence_logps

    if variant == "eager":
        def fn(logits, labels, cu):
            return reference.sequence_logps(logits, labels, cu_seqlens=cu)
    elif variant == "compile":
        compiled = torch.compile(reference.sequence_logps)

        def fn(logits, labels, cu):
            return compiled(logits, labels)
    elif variant == "trl":
        def fn(logits, labels, cu):
            return trl_style_logps(logits, labels)
    else:
        backend, inplace = _fused_variant(variant)

        def fn(logits, labels, cu):
            return sequence_logps(logits, labels, cu_seqlens=cu, backend=backend, inplace_backward=inplace)

    def step(logits, labels, cu):
        out = fn(logits, labels, cu)
        (grad,) = torch.autograd.grad(out.sum(), logits)  # as an upstream layer would receive it
        del grad
        return out.detach().sum()

    return step


def _loss_step(variant: str, cfg: Config):
    from safedpo_kernels import reference, safedpo_loss

    ref, cs, rs = _pair_extras(cfg)
    backend, inplace = (None, False) if variant == "eager" else _fused_variant(variant)

    def step(logits, labels, cu):
        if variant == "eager":
            loss = reference.safedpo_loss(logits, labels, ref, cs, rs, beta=BETA, cu_seqlens=cu).loss
        else:
            loss = safedpo_loss(logits, labels, ref, cs, rs, beta=BETA, cu_seqlens=cu, backend=backend,
                                inplace_backward=inplace).loss
        (grad,) = torch.autograd.grad(loss, logits)
        del grad
        return loss.detach()

    return step


def _linear_inputs(cfg: Config):
    dt = getattr(torch, cfg.dtype)

    def make_inputs():
        g = torch.Generator(device=cfg.device).manual_seed(0)
        labels, cu = _labels(cfg, g)
        hidden = _rows(cfg, cfg.H, g, dt).requires_grad_()
        weight = (torch.randn(cfg.V, cfg.H, generator=g, device=cfg.device, dtype=dt) / cfg.H**0.5).requires_grad_()
        return hidden, weight, labels, cu

    return make_inputs


def _dpo_from_token_logps(token_logps: torch.Tensor, labels: torch.Tensor, cu=None) -> torch.Tensor:
    tok = token_logps.float() * (labels != -100)
    if cu is None:
        seq = tok.sum(-1)
    else:
        csum = torch.cat([tok.new_zeros(1), tok.cumsum(0)])
        seq = csum[cu[1:].long()] - csum[cu[:-1].long()]
    B = seq.shape[0] // 2
    return -torch.nn.functional.logsigmoid(BETA * (seq[:B] - seq[B:])).mean()


def _linear_step(variant: str, cfg: Config):
    from safedpo_kernels import linear_safedpo_loss, reference

    ref, cs, rs = _pair_extras(cfg)
    if variant == "eager":
        def loss_fn(hidden, weight, labels, cu):
            return reference.safedpo_loss(hidden @ weight.t(), labels, ref, cs, rs, beta=BETA, cu_seqlens=cu).loss
    elif variant.startswith("ours-"):
        backend, inplace = _fused_variant(variant[len("ours-"):])
        if inplace:
            raise ValueError(f"unknown variant {variant!r}: the linear path has no in-place backward")

        def loss_fn(hidden, weight, labels, cu):
            return linear_safedpo_loss(hidden, weight, labels, ref, cs, rs, beta=BETA, cu_seqlens=cu, backend=backend).loss
    elif variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False)

        def loss_fn(hidden, weight, labels, cu):
            out = liger(weight, hidden, labels)
            return out[0] if isinstance(out, tuple) else out
    elif variant == "cce":
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if cfg.device == "cuda" else "torch_compile"

        def loss_fn(hidden, weight, labels, cu):
            # Exact gradients (filter_eps=None): CCE's default skips small softmax entries.
            ce = linear_cross_entropy(hidden, weight, labels, reduction="none", filter_eps=None, impl=impl)
            return _dpo_from_token_logps(-ce, labels, cu)
    else:
        raise ValueError(f"unknown linear variant {variant!r}")

    def step(hidden, weight, labels, cu):
        loss = loss_fn(hidden, weight, labels, cu)
        loss.backward()
        return loss.detach()

    return step


def build(op: str, variant: str, cfg: Config):
    if cfg.packed and variant in PADDED_ONLY:
        raise ValueError(f"variant {variant!r} takes padded batches only (packed=True)")
    if op == "sequence_logps":
        return _logits_inputs(cfg), _seq_logps_step(variant)
    if op == "safedpo_loss":
        return _logits_inputs(cfg), _loss_step(variant, cfg)
    if op == "linear_safedpo_loss":
        return _linear_inputs(cfg), _linear_step(variant, cfg)
    raise ValueError(f"unknown op {op!r}")


def floor_bytes(op: str, cfg: Config) -> int:
    """Bytes that must move at least once: read the logits forward, read them and write the gradient
    backward (logits ops); hidden + weight in and their gradients out (linear)."""
    elt = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    if op == "linear_safedpo_loss":
        return 2 * elt * (cfg.tokens() * cfg.H + cfg.V * cfg.H)
    return 3 * elt * cfg.tokens() * cfg.V


def floor_flops(op: str, cfg: Config) -> int:
    """The least matmul work of the linear path: 3 matmuls (logits, d hidden, d weight) over the counted
    (response) tokens, the only ones whose logits matter. A design that recomputes the logits in
    backward does a fourth."""
    if op != "linear_safedpo_loss":
        return 0
    counted = sum(L - L // 4 for L in cfg.lengths())
    return 3 * 2 * counted * cfg.V * cfg.H
