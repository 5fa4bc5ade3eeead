"""Models and the policy's SafeDPO loss through the fused kernels.

``PairScorer`` wraps a Hugging Face causal LM so that one forward call returns the (2B,) sequence
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
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from safedpo_kernels.integrations.hf import CausalLMLoss, PairInputs, attention_softcap, check_attention, text_config
from safedpo_kernels.options import LossOptions

from .versions import major_minor

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


def pick_attn_implementation(requested: str, device: torch.device, model_class=None, config=None) -> str:
    """"auto": what the model supports, fastest first -- flash_attention_2 on CUDA when flash_attn is
    installed, else SDPA, else eager. A model that soft-caps its attention scores (Gemma 2) never gets
    SDPA, which has no soft-cap: some transformers releases (5.17 among them) mark Gemma 2 as SDPA-capable
    and then drop the cap without a word, computing another model. An explicit "sdpa" for such a model is
    a ValueError."""
    if requested != "auto":
        check_attention(config, requested)
        return requested

    def supports(*flags):
        return model_class is None or any(getattr(model_class, f, False) for f in flags)

    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None and supports(
            "_supports_flash_attn", "_supports_flash_attn_2"):
        return "flash_attention_2"
    return "sdpa" if attention_softcap(config) is None and supports("_supports_sdpa") else "eager"


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


def load_tokenizer(path: str, what: str = "tokenizer"):
    """The tokenizer at ``path`` (pad token = EOS when it has none). ``what`` names ``path`` in the error
    when nothing is there: "model" when the tokenizer is taken from the model's directory."""
    from transformers import AutoTokenizer

    tok = _pretrained(AutoTokenizer, path, what)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def config_tokenizer(section, model_dir: Optional[str] = None):
    """The model section's tokenizer: ``tokenizer``, else the one saved with ``model_dir`` (a trained
    model), else the model's; an error for a missing directory names the key it came from."""
    if section.tokenizer:
        return load_tokenizer(section.tokenizer)
    if model_dir and (Path(model_dir) / "tokenizer_config.json").is_file():
        return load_tokenizer(model_dir)
    return load_tokenizer(section.path, what="model")


# The oldest transformers the trainer is tested with (5.17 and 5.24). 4.56 computed wrong log-probs for
# packed batches under SDPA (sequences attended to each other) and lacks the decoder outputs the
# fused-linear path reads.
TRANSFORMERS_FLOOR = (5, 17)


def check_transformers(version: Optional[str] = None) -> None:
    """ImportError when the installed transformers is older than the trainer's floor."""
    import transformers

    version = version or transformers.__version__
    if major_minor(version) < TRANSFORMERS_FLOOR:
        floor = ".".join(map(str, TRANSFORMERS_FLOOR))
        raise ImportError(f"the safedpo trainer needs transformers >= {floor} (this is {version}; older releases "
                          f"give packed batches wrong log-probs): pip install 'transformers>={floor}'")


def build_model(section, vocab_size: int, device: torch.device, path: Optional[str] = None, seed: int = 0):
    """The model section's model (``path`` instead of its own, when given): AutoModelForCausalLM from a
    local directory or a Hub id (which downloads when the machine is online), or a tiny Llama from
    ``tiny_model`` initialised from ``seed``; the attention implementation the model supports."""
    check_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    path = path or section.path
    if path:
        config = _pretrained(AutoConfig, path, "model")
        attn = pick_attn_implementation(section.attn_implementation, device, causal_lm_class(config), config)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    else:
        attn = pick_attn_implementation(section.attn_implementation, device, LlamaForCausalLM)
        kwargs = dict(TINY_LLAMA, **section.tiny_model)
        kwargs.setdefault("vocab_size", vocab_size)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**kwargs, attn_implementation=attn))
    if section.gradient_checkpointing:  # transformers 5 renamed it
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model.to(device)


def check_token_ids(model, tokenizer_name: str, **example_sets) -> None:
    """ValueError when a token id of the examples is past the model's vocabulary (a tokenizer with added
    tokens and no ``resize_token_embeddings``, or another model's tokenizer), naming the set and the id;
    checked once here, on the host, so that the steps need not (a compiled step reads no values)."""
    rows = model.get_input_embeddings().num_embeddings
    heads = text_config(model).vocab_size
    limit = min(rows, heads)
    for name, examples in example_sets.items():
        top = max((max(e.prompt_ids + e.chosen_ids + e.rejected_ids, default=-1) for e in examples), default=-1)
        if top >= limit:
            raise ValueError(f"the {name} data has token id {top} but the model's vocabulary has {limit} entries: "
                             f"{tokenizer_name} is not this model's tokenizer, or tokens were added to it without "
                             "resizing the model's embeddings (model.resize_token_embeddings)")


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


class PairScorer(nn.Module):
    """A causal LM as the trainer runs it on a batch of pairs: batch -> the (2B,) float32 sequence
    log-probs of its labels (the reference's use), or, given the loss's options and the reference
    log-probs, the SafeDPO loss of the pairs (the policy's).

    The way from the model to the loss is safedpo_kernels.integrations.hf.CausalLMLoss (shared with the
    TRL integration): loss_input "logits" (fused kernels, in-place backward), "linear" (the decoder's
    hidden states and the LM head, no logits; the model's logit transform is checked here, at
    construction) or "eager" (the plain PyTorch baseline). The loss is computed inside forward, so that
    DDP sees it; wrapping this module (not the bare model) in DDP keeps the fused-linear path, which
    calls the decoder and the LM head separately, inside DDP's forward.

    ``router_aux``: also return a mixture-of-experts router's load-balancing loss. ``validate=False`` (a
    compiled forward): the kernels read no values on the host; the caller has checked the token ids
    (``check_token_ids``). ``token_stats``: the loss's output carries the rows' token statistics.
    """

    def __init__(self, model, loss_input: str = "logits", average: bool = False, backend: str = "auto",
                 router_aux: bool = False, validate: bool = True, token_stats: bool = False):
        super().__init__()
        self.model = model
        self.average = average
        self.adapter = CausalLMLoss(model, loss_input, backend, router_aux, fallback="loss_input: logits", validate=validate,
                                    token_stats=token_stats)

    @property
    def loss_input(self) -> str:
        return self.adapter.loss_input

    @property
    def backend(self) -> str:
        return self.adapter.backend

    def forward(self, batch: dict, loss: Optional[LossOptions] = None, ref_logps=None, denominators=None):
        """Without ``loss``: the (2B,) log-probs (means with ``average``). With the loss's options (whose
        average must be this module's), the reference log-probs and, optionally, the divisors of a "mean"
        reduction (``denominators``: over a whole global batch): a ModelLoss(SafeDPOOutput, aux_loss)."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        # No KV cache in training: with one, transformers would not build the block-diagonal attention of
        # a packed batch from its position ids (it only does so for cache-free forwards).
        inputs["use_cache"] = False
        request = None
        if loss is not None:
            if loss.average != self.average:
                raise ValueError(f"the loss's average={loss.average} differs from the policy's average={self.average}")
            request = PairInputs(ref_logps, batch["chosen_safe"], batch["rejected_safe"], loss, denominators)
        out = self.adapter(self.model, inputs, batch["labels"], cu_seqlens=batch.get("cu_seqlens"), average=self.average,
                           loss=request)
        return out if loss is not None else out.result
