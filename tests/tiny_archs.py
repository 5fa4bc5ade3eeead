"""Real architectures as tiny random models built from their configs (nothing is downloaded), a batch of
pairs padded and packed, the float64 oracle of their log-probs, and ours through the trainer's PairScorer:
shared by the trainer's model tests and the Hugging Face integration's."""

import torch
import transformers

from safedpo.collate import collate_packed, collate_padded
from safedpo.data import Example
from safedpo.model import PairScorer, causal_lm_class, pick_attn_implementation
from safedpo_kernels import reference

V = 101
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Transforms chosen so that they matter at these tiny models' logit sizes (|z| ~ 1): a small softcap
# bends every logit, a scale far from 1 moves every log-prob.
ARCHS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=8)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=32, router_aux_loss_coef=0.02)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02)),
    "gemma": ("GemmaConfig", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", dict(head_dim=8, final_logit_softcapping=0.7, attn_logit_softcapping=0.5)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=8, final_logit_softcapping=0.9, sliding_window=8)),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "cohere": ("CohereConfig", dict(logit_scale=3.0)),
    "granite": ("GraniteConfig", dict(logits_scaling=0.25, embedding_multiplier=2.0, residual_multiplier=0.5,
                                      attention_multiplier=0.5)),
    "gpt_neox": ("GPTNeoXConfig", dict(use_parallel_residual=True)),
}


def build(name: str, attn: str = "auto"):
    config_name, extra = ARCHS[name]
    config = getattr(transformers, config_name)(**{**BASE, **extra})
    cls = causal_lm_class(config)
    config._attn_implementation = pick_attn_implementation(attn, torch.device("cpu"), cls, config)
    torch.manual_seed(0)
    model = cls(config).float()
    # Random initial weights are near zero: larger ones make the logits (and the transforms) matter.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model


def batch_of(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    examples = [Example(ids(3 + i), ids(4 + 2 * i), ids(6 - i), bool(i % 2), True) for i in range(B)]
    return collate_padded(examples, pad_id=0), collate_packed(examples)


def oracle(model, batch, upstream):
    """Log-probs from the model's own logits, float64 reference; d(sum upstream * logps) / d params."""
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = reference.sequence_logps(logits.double(), batch["labels"])
    (logps * upstream.double()).sum().backward()
    return logps.detach(), grads(model)


def grads(model):
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()])


def ours(model, loss_input, batch, upstream):
    model.zero_grad()
    logps = PairScorer(model, loss_input, backend="torch")(batch)
    (logps * upstream).sum().backward()
    return logps.detach(), grads(model)
