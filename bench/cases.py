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

    Linear cases only -- bias: the LM head has a bias (V,). ref_model: the reference log-probs are part
    of the step, computed under torch.no_grad from a reference model's own hidden states (N, T, H) and
    head (V, H) (and bias), as Liger-Kernel's DPO benchmark does, instead of being given as zeros.
    """

    N: int
    T: int
    V: int
    H: int = 256
    dtype: str = "float32"
    device: str = "cpu"
    ragged: bool = False
    packed: bool = False
    bias: bool = False
    ref_model: bool = False

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
        extras = [x for x, on in (("bias", self.bias), ("ref model", self.ref_model)) if on]
        return f"{self.N} x {self.T}" + (f" {layout}" if layout else "") + "".join(f", {x}" for x in extras)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def variants(op: str, device: str) -> list:
    """The variants that can run here, eager first."""
    from safedpo_kernels import available_backends

    # The Triton interpreter (CPU tensors under TRITON_INTERPRET=1) checks math; it is not timed.
    backends = [b for b in available_backends(device) if not (b == "triton" and device == "cpu")]
    ours = [v for b in backends for v in (b, f"{b}-inplace")]
    if op == "sequence_logps":
        return ["eager", "compile", "eager-gather"] + ours
    if op == "safedpo_loss":
        return ["eager"] + [v for v in ours if v.endswith("inplace")] + [f"{b}-inplace-stats" for b in backends]
    linear = ["eager"] + [f"ours-{v}" for v in ours if not v.endswith("inplace")]
    linear += [f"ours-{b}-stats" for b in backends]
    if _has("trl"):
        linear.append("trl-head")
    if _has("liger_kernel"):
        linear.append("liger")
    if _has("cut_cross_entropy"):
        linear.append("cce")
    return linear


# Variants with no packed (cu_seqlens) form: the eager gather loop, TRL's head (as DPOTrainer calls it) and
# Liger's DPO loss take (N, T) batches; torch.compile of the reference would recompile on every cu_seqlens.
PADDED_ONLY = ("eager-gather", "trl-head", "liger", "compile")


def eager_gather_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The memory-saving eager idiom of TRL's trainers before their fused head (variant "eager-gather"):
    gather the target logits, then take each sequence's log-sum-exp one sequence at a time, so only one
    sequence's float32 temporaries exist."""
    counted = labels != -100
    index = labels.clamp(min=0).unsqueeze(-1)
    per_token = []
    for row_logits, row_index in zip(logits, index):
        row = row_logits.float()
        per_token.append(row.gather(-1, row_index).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return (torch.stack(per_token) * counted).sum(-1)


def _fused_variant(variant: str, stats: bool = False):
    """"torch", "native-inplace", ... -> (backend, inplace_backward), and with ``stats`` also whether it
    asks for token statistics ("native-inplace-stats"); anything else is an error (a typo such as
    "torch-compile" must not silently run another variant)."""
    backend, _, suffix = variant.partition("-")
    flags = suffix.split("-") if suffix else []
    allowed = ("inplace", "stats") if stats else ("inplace",)
    if any(f not in allowed for f in flags) or len(set(flags)) != len(flags) or flags != sorted(flags, key=allowed.index):
        raise ValueError(f"unknown variant {variant!r}")
    out = (backend, "inplace" in flags)
    return (*out, "stats" in flags) if stats else out


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
    elif variant == "eager-gather":
        def fn(logits, labels, cu):
            return eager_gather_logps(logits, labels)
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
    backend, inplace, stats = (None, False, False) if variant == "eager" else _fused_variant(variant, stats=True)

    def step(logits, labels, cu):
        if variant == "eager":
            loss = reference.safedpo_loss(logits, labels, ref, cs, rs, beta=BETA, cu_seqlens=cu).loss
        else:
            loss = safedpo_loss(logits, labels, ref, cs, rs, beta=BETA, cu_seqlens=cu, backend=backend,
                                inplace_backward=inplace, token_stats=stats).loss
        (grad,) = torch.autograd.grad(loss, logits)
        del grad
        return loss.detach()

    return step


def _linear_inputs(cfg: Config):
    """make_inputs() -> (hidden, weight, bias, labels, cu, ref): bias None unless cfg.bias; ref None, or
    the reference model's (hidden, weight, bias) when cfg.ref_model (no gradients)."""
    dt = getattr(torch, cfg.dtype)

    def head(g, grad: bool):
        weight = torch.randn(cfg.V, cfg.H, generator=g, device=cfg.device, dtype=dt) / cfg.H**0.5
        bias = torch.randn(cfg.V, generator=g, device=cfg.device, dtype=dt) * 0.1 if cfg.bias else None
        return weight.requires_grad_(grad), None if bias is None else bias.requires_grad_(grad)

    def make_inputs():
        g = torch.Generator(device=cfg.device).manual_seed(0)
        labels, cu = _labels(cfg, g)
        hidden = _rows(cfg, cfg.H, g, dt).requires_grad_()
        weight, bias = head(g, True)
        ref = None
        if cfg.ref_model:
            ref_hidden = _rows(cfg, cfg.H, g, dt)
            ref = (ref_hidden, *head(g, False))
        return hidden, weight, bias, labels, cu, ref

    return make_inputs


def _sequence_sums(token_logps: torch.Tensor, labels: torch.Tensor, cu=None) -> torch.Tensor:
    """(N,) float32 sums of counted token log-probs, padded (N, T) or packed (total,) with cu_seqlens."""
    tok = token_logps.float() * (labels != -100)
    if cu is None:
        return tok.sum(-1)
    csum = torch.cat([tok.new_zeros(1), tok.cumsum(0)])
    return csum[cu[1:].long()] - csum[cu[:-1].long()]


def _dpo(seq: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The DPO loss of (2B,) sequence log-probs against the reference's (2B,)."""
    d = seq - ref
    B = seq.shape[0] // 2
    return -torch.nn.functional.logsigmoid(BETA * (d[:B] - d[B:])).mean()


# What DPOTrainer (TRL 1.16) asks of its fused head for every batch: the log-probs and the statistics of
# its entropy, logits/* and mean_token_accuracy metrics.
TRL_HEAD_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
TRL_HEAD_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


def _trl_head_token_logps(hidden, weight, bias, labels) -> torch.Tensor:
    """Per-token log-probs (0 where ignored) from TRL's fused LM head, called as DPOTrainer's patched
    forward calls it (trl/trainer/utils.py, add_fused_lm_head): the counted positions only on a GPU with
    Triton, every position elsewhere; TRL's 32768-column vocabulary chunks; its statistics computed too."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton

    mask = labels != -100
    compact = _use_triton(hidden.device)
    flat = hidden[mask] if compact else hidden.reshape(-1, hidden.shape[-1])
    targets = labels[mask] if compact else labels.clamp(min=0).reshape(-1)
    log_probs = ChunkedLogProbFunction.apply(flat, weight, bias, targets, 1.0, TRL_HEAD_CHUNK, None, 1.0,
                                             TRL_HEAD_OUTPUTS)[0]
    if compact:
        return log_probs.new_zeros(mask.shape).masked_scatter(mask, log_probs)
    return log_probs.view(mask.shape).masked_fill(~mask, 0)


def _cce_token_logps(hidden, weight, bias, labels, impl: str) -> torch.Tensor:
    """Per-token log-probs from Cut Cross-Entropy (exact gradients: filter_eps=None; its default skips
    small softmax entries). CCE has no bias: a bias enters as one more hidden column of ones against a
    weight column holding the bias, padded with zeros to a multiple of 8 columns (tensor-core friendly)."""
    from cut_cross_entropy import linear_cross_entropy

    if bias is not None:
        pad = 8 - hidden.shape[-1] % 8
        ones = hidden.new_ones(*hidden.shape[:-1], 1)
        hidden = torch.cat([hidden, ones, hidden.new_zeros(*hidden.shape[:-1], pad - 1)], dim=-1)
        weight = torch.cat([weight, bias.unsqueeze(1), weight.new_zeros(weight.shape[0], pad - 1)], dim=1)
    return -linear_cross_entropy(hidden, weight, labels, reduction="none", filter_eps=None, impl=impl)


def _linear_variant(variant: str, cfg: Config):
    """(policy_loss(hidden, weight, bias, labels, cu, ref_logps), ref_logps(labels, cu, ref)) of a linear
    variant; ref_logps is None where the variant takes the reference model's inputs itself (Liger)."""
    from safedpo_kernels import linear_safedpo_loss, linear_sequence_logps, reference, safedpo_loss, sequence_logps

    _, cs, rs = _pair_extras(cfg)
    F = torch.nn.functional
    if variant == "eager":
        def loss(hidden, weight, bias, labels, cu, ref):
            return reference.safedpo_loss(F.linear(hidden, weight, bias), labels, ref, cs, rs, beta=BETA, cu_seqlens=cu).loss

        def ref_logps(labels, cu, ref_hidden, ref_weight, ref_bias):
            return reference.sequence_logps(F.linear(ref_hidden, ref_weight, ref_bias), labels, cu_seqlens=cu)
    elif variant.startswith("ours-"):
        # "ours-<backend>", or "ours-<backend>-stats": with token statistics, as TRL's head computes them
        backend, inplace, stats = _fused_variant(variant[len("ours-"):], stats=True)
        if inplace:
            raise ValueError(f"unknown variant {variant!r}: the linear path has no in-place backward")

        def loss(hidden, weight, bias, labels, cu, ref):
            return linear_safedpo_loss(hidden, weight, labels, ref, cs, rs, bias=bias, beta=BETA, cu_seqlens=cu,
                                       backend=backend, token_stats=stats).loss

        def ref_logps(labels, cu, ref_hidden, ref_weight, ref_bias):
            return linear_sequence_logps(ref_hidden, ref_weight, labels, bias=ref_bias, cu_seqlens=cu, backend=backend)
    elif variant.startswith("logits-"):
        # The logits materialized by the model's own head (cuBLAS), then our logits kernels with the
        # gradient written into the logits' storage: the path of a trainer that keeps its lm_head.
        backend, inplace = _fused_variant(variant[len("logits-"):])

        def loss(hidden, weight, bias, labels, cu, ref):
            return safedpo_loss(F.linear(hidden, weight, bias), labels, ref, cs, rs, beta=BETA, cu_seqlens=cu,
                                backend=backend, inplace_backward=inplace).loss

        def ref_logps(labels, cu, ref_hidden, ref_weight, ref_bias):
            return sequence_logps(F.linear(ref_hidden, ref_weight, ref_bias), labels, cu_seqlens=cu, backend=backend)
    elif variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # Liger compiles its chunk step with torch.compile, as its users run it on a GPU; on the CPU (the
        # dry run, the CPU suite) the same math runs eagerly rather than waiting on inductor per shape.
        liger = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=cfg.ref_model, compiled=cfg.device == "cuda")

        def loss(hidden, weight, bias, labels, cu, ref):
            # With a reference model ``ref`` is its (hidden, weight, bias), which Liger runs itself;
            # without one it is the zero reference log-probs, which Liger's reference-free loss implies.
            r = ref if cfg.ref_model else ()
            out = liger(weight, hidden, labels, bias, *r)
            return out[0] if isinstance(out, tuple) else out

        return loss, None
    elif variant == "trl-head":
        def loss(hidden, weight, bias, labels, cu, ref):
            return _dpo(_trl_head_token_logps(hidden, weight, bias, labels).sum(-1), ref)

        def ref_logps(labels, cu, ref_hidden, ref_weight, ref_bias):
            return _trl_head_token_logps(ref_hidden, ref_weight, ref_bias, labels).sum(-1)
    elif variant == "cce":
        impl = "cce" if cfg.device == "cuda" else "torch_compile"

        def loss(hidden, weight, bias, labels, cu, ref):
            return _dpo(_sequence_sums(_cce_token_logps(hidden, weight, bias, labels, impl), labels, cu), ref)

        def ref_logps(labels, cu, ref_hidden, ref_weight, ref_bias):
            return _sequence_sums(_cce_token_logps(ref_hidden, ref_weight, ref_bias, labels, impl), labels, cu)
    else:
        raise ValueError(f"unknown linear variant {variant!r}")
    return loss, ref_logps


def _linear_step(variant: str, cfg: Config):
    loss_fn, ref_fn = _linear_variant(variant, cfg)
    zeros, _, _ = _pair_extras(cfg)

    def step(hidden, weight, bias, labels, cu, ref):
        if ref is None:
            ref_arg = zeros
        elif ref_fn is None:
            ref_arg = ref  # the variant runs the reference model's inputs itself
        else:
            with torch.no_grad():
                ref_arg = ref_fn(labels, cu, *ref).float()
        loss = loss_fn(hidden, weight, bias, labels, cu, ref_arg)
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
        return (2 + cfg.ref_model) * elt * (cfg.tokens() * cfg.H + cfg.V * cfg.H)
    return 3 * elt * cfg.tokens() * cfg.V


def floor_flops(op: str, cfg: Config) -> int:
    """The least matmul work of the linear path: 3 matmuls (logits, d hidden, d weight) over the counted
    (response) tokens, the only ones whose logits matter, plus the reference model's logits (a 4th)
    when the step computes the reference log-probs. A design that recomputes the policy's logits in
    backward does one more."""
    if op != "linear_safedpo_loss":
        return 0
    counted = sum(L - L // 4 for L in cfg.lengths())
    return (3 + cfg.ref_model) * 2 * counted * cfg.V * cfg.H
