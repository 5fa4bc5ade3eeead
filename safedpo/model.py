"""Models and the policy's SafeDPO loss through the fused kernels.

``PolicyLogps`` wraps a Hugging Face causal LM so that one forward call returns the (2B,) sequence
log-probs of a batch, or its loss; wrapping it (not the bare model) in DDP keeps the fused-linear path,
which calls the decoder and the LM head separately, inside DDP's forward.

Real architectures differ in ways the fused-linear path must know about: what they do to the LM head's
output (Gemma 2/3 soft-cap it, Cohere scales it, Granite divides it), which attention implementations
they support (Gemma 2 has no SDPA path), and whether they have a router whose auxiliary loss trains
with the policy (Mixtral, Qwen-MoE). safedpo_kernels.integrations.hf (shared with the TRL integration)
reads the first from the config and verifies it against the model's own logits, so that an unknown
transform is an error rather than silently wrong log-probs, and computes the router's loss.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import NamedTuple, Optional

import torch
from torch import nn

from safedpo_kernels import linear_safedpo_loss, linear_sequence_logps, reference, safedpo_loss, sequence_logps
from safedpo_kernels.integrations.hf import check_linear_head, lm_head, logit_transform, router_aux_loss, router_config
from safedpo_kernels.loss import safedpo_loss_from_logps

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def quiet_libraries() -> None:
    """Our own progress bars only: transformers' and datasets' per-file bars are noise in a run's log."""
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def causal_lm_class(config):
    """The AutoModelForCausalLM class of a config (None when transformers has none)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def pick_attn_implementation(requested: str, device: torch.device, model_class=None) -> str:
    """"auto": what the model supports, fastest first -- flash_attention_2 on CUDA when flash_attn is
    installed, else SDPA, else eager (Gemma 2 has no SDPA path: its softcapped attention needs eager)."""
    if requested != "auto":
        return requested

    def supports(*flags):
        return model_class is None or any(getattr(model_class, f, False) for f in flags)

    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None and supports(
            "_supports_flash_attn", "_supports_flash_attn_2"):
        return "flash_attention_2"
    return "sdpa" if supports("_supports_sdpa") else "eager"


def _pretrained(loader, path: str, what: str, **kwargs):
    """``loader.from_pretrained(path)`` for a local directory or a Hub id; one clear line when neither."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError:
        if os.path.exists(path):
            raise  # a local directory that does not load: its own error says why
        hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is not None
        where = "no such local directory" + (", and not found on the Hugging Face Hub (offline, or an unknown id)"
                                              if hub_id else "")
        raise FileNotFoundError(f"{what} {path!r}: {where}") from None


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = _pretrained(AutoTokenizer, path, "tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(cfg, vocab_size: int, device: torch.device, path: Optional[str] = None):
    """AutoModelForCausalLM from a local directory or a Hub id (which downloads when the machine is
    online), or a tiny Llama from ``cfg.tiny_model``; the attention implementation the model supports."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    path = path or cfg.model
    if path:
        config = _pretrained(AutoConfig, path, "model")
        attn = pick_attn_implementation(cfg.attn_implementation, device, causal_lm_class(config))
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    else:
        attn = pick_attn_implementation(cfg.attn_implementation, device, LlamaForCausalLM)
        kwargs = dict(TINY_LLAMA, **cfg.tiny_model)
        kwargs.setdefault("vocab_size", vocab_size)
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(LlamaConfig(**kwargs, attn_implementation=attn))
    if cfg.gradient_checkpointing:  # transformers 5 renamed it
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model.to(device)


def apply_lora(model, lora: dict):
    """The model with LoRA adapters (peft) on ``target_modules`` (default: every linear layer but the LM
    head); only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("lora needs the peft package: pip install 'safedpo-kernels[lora]'") from None
    config = LoraConfig(r=int(lora.get("r", 16)), lora_alpha=float(lora.get("alpha", 2 * int(lora.get("r", 16)))),
                        lora_dropout=float(lora.get("dropout", 0.0)),
                        target_modules=lora.get("target_modules", "all-linear"), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class PolicyOutput(NamedTuple):
    """The policy's SafeDPO loss output and the router's auxiliary loss (None without a router)."""

    loss: object  # SafeDPOOutput
    aux_loss: Optional[torch.Tensor]


class PolicyLogps(nn.Module):
    """batch -> (2B,) float32 sequence log-probs of its labels, or with ``loss`` its SafeDPO loss.

    loss_input="logits": the model's logits through the fused kernels with an in-place backward (the
    logits' memory holds their gradient). loss_input="linear": the decoder's last hidden states and the
    LM head weight through the fused-linear functions, so the logits are never materialized; the loss
    forms its gradients in the forward (3 matmuls). loss_input="eager": plain PyTorch (log_softmax,
    gather, sum), a baseline. The loss is computed inside forward, so that DDP sees it.

    ``router_aux``: add a mixture-of-experts router's load-balancing loss to the result (its
    coefficient is the trainer's business).
    """

    def __init__(self, model, loss_input: str = "logits", average: bool = False, backend: str = "auto",
                 router_aux: bool = False):
        super().__init__()
        self.model = model
        self.loss_input = loss_input
        self.average = average
        self.backend = backend
        self.router = router_config(model) if router_aux else None
        self.transform = logit_transform(model)
        if loss_input == "linear":
            check_linear_head(model, self.transform)

    def _aux_loss(self, outputs, attention_mask) -> Optional[torch.Tensor]:
        return None if self.router is None else router_aux_loss(self.model, outputs, attention_mask)

    def forward(self, batch: dict, loss: Optional[dict] = None):
        """``loss``: None for the (2B,) log-probs; else the keywords of the SafeDPO loss (ref_logps,
        beta, delta, ...), and the result is a ``PolicyOutput``."""
        packed = "cu_seqlens" in batch
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        # No KV cache in training: with one, transformers would not build the block-diagonal attention of
        # a packed batch from its position ids (it only does so for cache-free forwards).
        inputs["use_cache"] = False
        if self.router is not None and loss is not None:
            inputs["output_router_logits"] = True
        kw = dict(average=self.average, backend=self.backend, cu_seqlens=batch.get("cu_seqlens"))
        pair = None if loss is None else (loss.pop("ref_logps"), batch["chosen_safe"], batch["rejected_safe"])
        if self.loss_input == "linear":
            outputs = self.model.get_decoder()(**inputs)
            hidden = outputs.last_hidden_state
            hidden = hidden[0] if packed else hidden
            weight, bias = lm_head(self.model)
            if pair is None:
                return linear_sequence_logps(hidden, weight, batch["labels"], bias=bias, **kw, **self.transform)
            out = linear_safedpo_loss(hidden, weight, batch["labels"], *pair, bias=bias, **kw, **self.transform, **loss)
            return PolicyOutput(out, self._aux_loss(outputs, batch.get("attention_mask")))
        outputs = self.model(**inputs)
        logits = outputs.logits[0] if packed else outputs.logits
        if self.loss_input == "eager":  # the plain PyTorch baseline, for comparisons
            logps = reference.sequence_logps(logits, batch["labels"], average=self.average, cu_seqlens=batch.get("cu_seqlens")).float()
            if pair is None:
                return logps
            out = safedpo_loss_from_logps(logps, *pair, **loss)
        else:
            # In-place backward only where the logits are ours alone; under torch.no_grad nothing is saved.
            kw["inplace_backward"] = torch.is_grad_enabled()
            if pair is None:
                return sequence_logps(logits, batch["labels"], **kw)
            out = safedpo_loss(logits, batch["labels"], *pair, **kw, **loss)
        return PolicyOutput(out, self._aux_loss(outputs, batch.get("attention_mask")))
