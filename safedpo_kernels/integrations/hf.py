"""What the fused-linear path must know about a Hugging Face causal LM, for any trainer that uses it.

The fused-linear functions take the decoder's last hidden states and the LM head's weight, so they
skip whatever the model's own forward does after the head: Gemma 2/3 soft-cap the logits, Cohere
scales them, Granite divides them. ``logit_transform`` reads that from the config, and
``check_linear_head`` verifies it against the model's own logits once, so that a transform this
package does not know is an error rather than silently wrong log-probs; ``lm_head`` hands out the
head's weight and bias, refusing PEFT adapters on the head, whose update that weight does not hold.
A mixture-of-experts model computes its router's load-balancing loss in the same skipped forward:
``router_aux_loss`` computes it from the decoder's outputs as the model would.

``CausalLMLoss`` puts these together: the one way from a model's forward to SafeDPO (decoder -> LM
head -> logit transform -> logits or fused-linear loss -> router loss) that both trainers use, the
package's own (safedpo.model.PairScorer) and TRL's (integrations.trl.SafeDPOTrainer).

No import of transformers here: these read the model objects they are given.
"""

from __future__ import annotations

import contextlib
import sys
from typing import NamedTuple, Optional

import torch

from .. import reference
from .._checks import check_denominators, check_pair_inputs
from ..api import logps_on_hidden, logps_on_logits, loss_on_hidden, loss_on_logits
from ..loss import Pairs, TokenStats, loss_from_logps
from ..options import CallOptions, LossOptions
from ..transform import LogitTransform


def text_config(model):
    """The text model's config (the config itself for a text-only model) of a model, or of a config."""
    config = getattr(model, "config", model)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_softcap(config) -> Optional[float]:
    """The soft-cap a model config puts on its attention scores (Gemma 2's attn_logit_softcapping), or None."""
    return None if config is None else getattr(text_config(config), "attn_logit_softcapping", None)


def check_attention(config, implementation: Optional[str] = None) -> None:
    """ValueError when ``implementation`` (default: the one the config was loaded with) cannot compute the
    model's attention: SDPA has no soft-cap, and some transformers releases (5.17 among them) run Gemma 2
    with SDPA anyway, dropping the cap without a word -- training and scoring another model than the
    checkpoint's."""
    softcap = attention_softcap(config)
    implementation = implementation or getattr(config, "_attn_implementation", None)
    if softcap is not None and implementation == "sdpa":
        raise ValueError(f"{getattr(config, 'model_type', type(config).__name__)} soft-caps its attention scores "
                         f"(attn_logit_softcapping={softcap}), which attn_implementation='sdpa' does not do: load it "
                         f"with attn_implementation='eager' (or 'flash_attention_2'); with TRL, "
                         f"model_init_kwargs={{'attn_implementation': 'eager'}}")


def logit_transform(model) -> LogitTransform:
    """What the model applies to its LM head's output (Gemma 2/3's final_logit_softcapping, Cohere's
    logit_scale, Granite's 1 / logits_scaling), as the fused-linear functions take it."""
    cfg = text_config(model)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = 1.0 / cfg.logits_scaling
    return LogitTransform(1.0 if scale is None else scale, softcap)


def lm_head(model) -> tuple:
    """(weight, bias) of the model's LM head, as the fused-linear functions take them.

    ValueError for a head wrapped by a PEFT tuner layer with active, unmerged adapters (LoRA with
    ``lm_head`` in target_modules, trainable tokens): its update is not in ``.weight``, so the fused-linear
    path would silently leave it out. (Merged or disabled adapters, and ``modules_to_save``, are fine.)
    """
    head = model.get_output_embeddings()
    if hasattr(head, "base_layer") and not getattr(head, "merged", False) and not getattr(head, "disable_adapters", False):
        raise ValueError(
            f"{type(model).__name__}: its LM head carries PEFT adapters ({type(head).__name__}), which the fused-linear "
            "path cannot see; leave lm_head out of the LoRA target_modules, or compute the loss from the logits"
        )
    return head.weight, head.bias


@torch.no_grad()
def check_linear_head(model, transform: LogitTransform, fallback: str = "loss_input: logits", forward=None) -> None:
    """ValueError when the LM head applied to the decoder's last hidden states, with ``transform``,
    does not reproduce the model's own logits on a short input: the model does something to its logits
    (or to the hidden states before the head) that the fused-linear path does not know. ``fallback``
    names the setting that avoids the fused-linear path, for the message; ``forward`` is the model's
    own forward when called from inside a replacement of it (default: calling the model)."""
    weight, bias = lm_head(model)
    vocab = weight.shape[0]
    device = weight.device
    ids = (torch.arange(1, 9, device=device) * 7919 % vocab).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        want = (forward or model)(input_ids=ids).logits.float()
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    finally:
        model.train(was_training)
    bias = None if bias is None else bias.float()
    got = reference.linear_logits(hidden.float(), weight.float(), bias, **transform.kwargs())
    # Beyond float32 rounding, a bf16/fp16 model rounds its own logits: allow for that, not for a
    # wrong scale or cap (which moves logits by several percent or more).
    tol = (1e-3 if weight.dtype == torch.float32 else 3e-2) * max(1.0, float(want.abs().max()))
    diff = float((got - want).abs().max())
    if not diff <= tol:
        raise ValueError(
            f"{type(model).__name__}: its logits are not its LM head applied to its last hidden states with "
            f"logit_scale={transform.logit_scale}, softcap={transform.softcap} (largest difference {diff:.3g}); "
            f"the fused-linear kernels do not know this model's logit transform. Use {fallback}."
        )


def uses_hub_kernel_funcs(model) -> bool:
    """Whether a module of ``model`` routes functions through the ``kernels`` package's per-instance
    wrappers (transformers >= 5.25 with ``kernels`` installed: every attention layer's rotary embedding)."""
    return any("_kernel_funcs" in vars(m) for m in model.modules())


_SKIP_REPLAYED_SIDE_EFFECTS = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def compile_context(model):
    """The dynamo setting a compiled forward and backward of ``model`` needs, as a context to run the
    compiled step in (a null context where none is needed).

    A hub-kernel wrapper (``uses_hub_kernel_funcs``) sets a module-level variable and restores it around
    every forward. Under activation checkpointing dynamo traces each layer inside a higher-order op that
    refuses mutations of outer state, so every checkpointed layer breaks the graph. Replaying that
    set-and-restore in the recomputation is a no-op, so dynamo may skip it there:
    ``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True`` (the setting users of
    their own compiled loops need too). Scoped to the step, so the rest of the program keeps dynamo's
    default. A torch that lacks the setting gets a null context."""
    import torch._dynamo

    # A torch without the setting (before 2.10) breaks the graph at each checkpointed layer: slower, same values.
    if not uses_hub_kernel_funcs(model) or not hasattr(torch._dynamo.config, _SKIP_REPLAYED_SIDE_EFFECTS):
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(**{_SKIP_REPLAYED_SIDE_EFFECTS: True})


def router_config(model) -> Optional[dict]:
    """{coef, num_experts, top_k} of a mixture-of-experts model that returns its router logits (its config
    has ``output_router_logits``, TRL's test too), else None. ``coef`` is the config's
    ``router_aux_loss_coef``, 0.0 where it declares none (DeepSeek-V3, GLM-4 MoE, ...: as TRL reads it);
    num_experts / top_k are None where the config names them otherwise."""
    cfg = text_config(model)
    if not hasattr(cfg, "output_router_logits"):
        return None
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    return dict(coef=float(getattr(cfg, "router_aux_loss_coef", None) or 0.0),
                num_experts=int(experts) if experts else None, top_k=int(top_k) if top_k else None)


def router_aux_loss(model, outputs, router: dict, attention_mask=None) -> Optional[torch.Tensor]:
    """The router's load-balancing loss (without its coefficient) of a forward run with
    ``output_router_logits=True``: the model's own ``aux_loss`` when it returned one, else (the decoder
    alone returns only the router logits) the model family's ``load_balancing_loss_func`` on them, as
    the model's forward computes it. ``router`` is ``router_config(model)``. None when the forward
    returned neither."""
    aux = getattr(outputs, "aux_loss", None)
    if aux is not None:
        return aux
    logits = getattr(outputs, "router_logits", None)
    if logits is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under LoRA adapters
    balance = getattr(sys.modules[type(base).__module__], "load_balancing_loss_func", None)
    if balance is None or router["num_experts"] is None or router["top_k"] is None:
        raise ValueError(f"{type(base).__name__}: no load_balancing_loss_func in its module, or no num_experts / "
                         "num_experts_per_tok in its config, to compute the router's auxiliary loss from the "
                         "decoder's outputs; use the logits path")
    return balance(logits, router["num_experts"], router["top_k"], attention_mask)


LOSS_INPUTS = ("logits", "linear", "eager")


class PairInputs(NamedTuple):
    """What a batch needs besides the model's inputs to be a SafeDPO loss: the (2B,) reference log-probs
    (or None), the (B,) safety flags, the loss's options, and the divisors of its "mean" reduction when
    the caller sets them (``denominators``: (pairs, tokens), e.g. over a trainer's global batch)."""

    ref_logps: Optional[torch.Tensor]
    chosen_safe: torch.Tensor
    rejected_safe: torch.Tensor
    options: LossOptions
    denominators: Optional[object] = None

    def pairs(self) -> Pairs:
        return Pairs(self.ref_logps, self.chosen_safe, self.rejected_safe, self.denominators)


class ModelLoss(NamedTuple):
    """A ``CausalLMLoss`` result: the SafeDPOOutput (or, without a PairInputs, the (2B,) float32 sequence
    log-probs) and the router's auxiliary loss (None without a router, or when not asked for)."""

    result: object
    aux_loss: Optional[torch.Tensor]


class CausalLMLoss:
    """A Hugging Face causal LM's batch -> its sequence log-probs, or its SafeDPO loss.

    loss_input "logits": the model's logits through the fused kernels, the backward written into the
    logits' own memory (they are ours alone; under torch.no_grad nothing is saved). "linear": the
    decoder's last hidden states and the LM head through the fused-linear functions, with the model's
    logit transform (read from its config, checked against its own logits here, at construction, so that
    a wrong transform is refused before training and no check runs inside a compiled forward), never
    materializing the logits. "eager": plain PyTorch (log_softmax, gather, sum), a baseline.
    ``router_aux``: also return a mixture-of-experts router's load-balancing loss (without its
    coefficient, which is the trainer's business; a ValueError for a model without a router, and for a
    forward that returns none). ``fallback`` names the setting that avoids the
    fused-linear path, for the error a model with an unknown logit transform gets. ``validate=False``: the
    kernels skip the checks that read values on the host (label range, 0/1 flags), so that a compiled
    forward has no graph break of ours; the caller then answers for labels in [0, V) (out-of-range
    labels give wrong values, never out-of-bounds access). ``token_stats``: a loss's output also carries
    the rows' token statistics (entropy, mean logit, top-1 accuracy; see ``token_metrics``), from the
    same pass.
    """

    def __init__(self, model, loss_input: str = "logits", backend: str = "auto", router_aux: bool = False,
                 fallback: str = "loss_input: logits", validate: bool = True, token_stats: bool = False):
        if loss_input not in LOSS_INPUTS:
            raise ValueError(f"loss_input must be one of {LOSS_INPUTS}, got {loss_input!r}")
        self.loss_input = loss_input
        self.backend = backend
        check_attention(model.config)
        self.transform = logit_transform(model)
        # Read once: the config does not change between steps.
        self.router = router_config(model) if router_aux else None
        if router_aux and self.router is None:
            raise ValueError(f"router_aux: {type(model).__name__} is not a mixture-of-experts model that returns its "
                             "router logits (no output_router_logits in its config)")
        self.fallback = fallback
        self.validate = validate
        self.token_stats = token_stats
        # Built once: a compiled forward then only reads them. The logits path writes its backward into the
        # logits (they are ours alone) when a backward will follow.
        call = CallOptions.of(backend=backend, validate=validate, **self.transform.kwargs())
        self.calls = {False: call, True: call.replace(inplace_backward=True)}
        self.loss_calls = {k: c.replace(token_stats=token_stats) for k, c in self.calls.items()}
        if loss_input == "linear":
            check_linear_head(model, self.transform, fallback=fallback)

    def __call__(self, model, inputs: dict, labels: torch.Tensor, *, cu_seqlens=None, average: bool = False,
                 loss: Optional[PairInputs] = None, forward=None) -> ModelLoss:
        """``inputs``: the model's keyword inputs (input_ids, attention_mask, ...), (1, total) with
        ``cu_seqlens`` for a packed batch. ``labels`` (2B, T) or (total,), aligned with the logits.
        ``average``: mean log-probs (with a ``loss``, its options' average counts). ``forward``: what
        computes the full model's outputs (default: ``model`` itself; a DDP-wrapped model, or the
        original forward inside a replacement of it)."""
        packed = cu_seqlens is not None
        inputs = dict(inputs)
        if self.router is not None and loss is not None:
            inputs["output_router_logits"] = True
        average = loss.options.average if loss is not None else average
        call = (self.calls if loss is None else self.loss_calls)[self.loss_input == "logits" and torch.is_grad_enabled()]
        if self.loss_input == "linear":
            outputs = model.get_decoder()(**inputs)
            hidden = outputs.last_hidden_state[0] if packed else outputs.last_hidden_state
            weight, bias = lm_head(model)
            if loss is None:
                return ModelLoss(logps_on_hidden(hidden, weight, bias, labels, average, call, cu_seqlens), None)
            out = loss_on_hidden(hidden, weight, bias, labels, loss.pairs(), loss.options, call, cu_seqlens)
        else:
            outputs = (forward or model)(**inputs)
            logits = outputs.logits[0] if packed else outputs.logits
            if self.loss_input == "eager":
                logps = reference.sequence_logps(logits, labels, average=average, cu_seqlens=cu_seqlens).float()
                if loss is None:
                    return ModelLoss(logps, None)
                check_pair_inputs(logps.shape[0], logps.device, *loss[:3], rows_name="the logits", validate=self.validate)
                counts = reference.token_counts(labels, cu_seqlens=cu_seqlens) if loss.options.uses_sft else None
                denominators = check_denominators(loss.denominators, loss.options, logps.device)
                token_stats = None
                if self.token_stats:
                    with torch.no_grad():
                        stats = reference.token_stats(logits.detach(), labels, cu_seqlens=cu_seqlens)
                    token_stats = TokenStats.of(torch.stack(stats, dim=1).float())
                out = loss_from_logps(logps, *loss[:4], counts, denominators, token_stats)
            else:
                if loss is None:
                    return ModelLoss(logps_on_logits(logits, labels, average, call, cu_seqlens), None)
                out = loss_on_logits(logits, labels, loss.pairs(), loss.options, call, cu_seqlens)
        aux = None
        if self.router is not None:
            aux = router_aux_loss(model, outputs, self.router, inputs.get("attention_mask"))
            if aux is None:  # a weighted load-balancing loss must not be dropped without a word
                raise ValueError(f"{type(model).__name__} returned neither an aux_loss nor router logits with "
                                 "output_router_logits=True: its router's load-balancing loss cannot be added; "
                                 "set the router loss coefficient to 0")
        return ModelLoss(out, aux)


def token_metric_sums(stats: TokenStats) -> torch.Tensor:
    """(7,) float64 sums of a batch's token statistics ((2B,) rows, chosen rows first) that add up over
    micro-batches and ranks: entropy and tokens of all rows, mean logits and tokens of the chosen rows
    and of the rejected rows, and the chosen rows' top-1 count (``token_metrics`` turns them into DPO
    trainers' metrics)."""
    B = stats.tokens.shape[0] // 2
    e, m, t, n = (x.detach().double() for x in stats)
    return torch.stack([e.sum(), n.sum(), m[:B].sum(), n[:B].sum(), m[B:].sum(), n[B:].sum(), t[:B].sum()])


def token_metrics(sums) -> dict:
    """TRL DPOTrainer's token metrics from ``token_metric_sums`` (added up): ``entropy`` (mean over every
    completion token), ``logits/chosen`` and ``logits/rejected`` (the mean logit per token of each
    role's rows, in the data's order), ``mean_token_accuracy`` (top-1 over the chosen rows' tokens); 0.0
    where there is no token."""
    e, n, mc, nc, mr, nr, tc = (float(x) for x in sums)

    def mean(a, b):
        return a / b if b > 0 else 0.0

    return {"entropy": mean(e, n), "logits/chosen": mean(mc, nc), "logits/rejected": mean(mr, nr),
            "mean_token_accuracy": mean(tc, nc)}


__all__ = ["text_config", "logit_transform", "uses_hub_kernel_funcs", "compile_context", "lm_head", "check_linear_head",
           "router_config", "router_aux_loss",
           "CausalLMLoss", "PairInputs", "ModelLoss", "LOSS_INPUTS", "token_metric_sums", "token_metrics"]
