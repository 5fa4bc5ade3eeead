"""Models and the policy's sequence log-probs through the fused kernels.

``PolicyLogps`` wraps a Hugging Face causal LM so that one forward call returns the (2B,) sequence
log-probs of a batch; wrapping it (not the bare model) in DDP keeps the fused-linear path, which calls
the decoder and the LM head separately, inside DDP's forward.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import nn

from safedpo_kernels import linear_safedpo_loss, linear_sequence_logps, reference, safedpo_loss, sequence_logps
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


def pick_attn_implementation(requested: str, device: torch.device) -> str:
    """"auto": flash_attention_2 on CUDA when flash_attn imports, else sdpa."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(cfg, vocab_size: int, device: torch.device, path: Optional[str] = None):
    """AutoModelForCausalLM from a local directory, or a tiny Llama from ``cfg.tiny_model``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    attn = pick_attn_implementation(cfg.attn_implementation, device)
    path = path or cfg.model
    if path:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    else:
        kwargs = dict(TINY_LLAMA, **cfg.tiny_model)
        kwargs.setdefault("vocab_size", vocab_size)
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(LlamaConfig(**kwargs, attn_implementation=attn))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device)


class PolicyLogps(nn.Module):
    """batch -> (2B,) float32 sequence log-probs of its labels, or with ``loss`` its SafeDPO loss.

    loss_input="logits": the model's logits through the fused kernels with an in-place backward (the
    logits' memory holds their gradient). loss_input="linear": the decoder's last hidden states and the
    LM head weight through the fused-linear functions, so the logits are never materialized; the loss
    forms its gradients in the forward (3 matmuls). loss_input="eager": plain PyTorch (log_softmax,
    gather, sum), a baseline. The loss is computed inside forward, so that DDP sees it.
    """

    def __init__(self, model, loss_input: str = "logits", average: bool = False, backend: str = "auto",
                 logit_scale: float = 1.0, softcap: Optional[float] = None):
        super().__init__()
        self.model = model
        self.loss_input = loss_input
        self.average = average
        self.backend = backend
        self.transform = dict(logit_scale=logit_scale, softcap=softcap)

    def forward(self, batch: dict, loss: Optional[dict] = None):
        """``loss``: None for the (2B,) log-probs; else the keywords of the SafeDPO loss (ref_logps,
        beta, delta, ...), and the result is its SafeDPOOutput."""
        packed = "cu_seqlens" in batch
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        kw = dict(average=self.average, backend=self.backend, cu_seqlens=batch.get("cu_seqlens"))
        pair = None if loss is None else (loss.pop("ref_logps"), batch["chosen_safe"], batch["rejected_safe"])
        if self.loss_input == "linear":
            hidden = self.model.get_decoder()(**inputs).last_hidden_state
            hidden = hidden[0] if packed else hidden
            head = self.model.get_output_embeddings()
            if pair is None:
                return linear_sequence_logps(hidden, head.weight, batch["labels"], bias=head.bias, **kw, **self.transform)
            return linear_safedpo_loss(hidden, head.weight, batch["labels"], *pair, bias=head.bias, **kw, **self.transform,
                                       **loss)
        logits = self.model(**inputs).logits
        logits = logits[0] if packed else logits
        if self.loss_input == "eager":  # the plain PyTorch baseline, for comparisons
            logps = reference.sequence_logps(logits, batch["labels"], average=self.average, cu_seqlens=batch.get("cu_seqlens")).float()
            return logps if pair is None else safedpo_loss_from_logps(logps, *pair, **loss)
        # In-place backward only where the logits are ours alone; under torch.no_grad nothing is saved.
        kw["inplace_backward"] = torch.is_grad_enabled()
        if pair is None:
            return sequence_logps(logits, batch["labels"], **kw)
        return safedpo_loss(logits, batch["labels"], *pair, **kw, **loss)
