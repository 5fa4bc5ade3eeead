"""Real architectures, as tiny random models built from their configs (nothing is downloaded).

For each: the policy's sequence log-probs through the trainer's PolicyLogps with loss_input logits,
linear and eager, padded and packed, equal the log-probs computed from ``model(input_ids).logits`` by
the float64 reference, and so do their gradients with respect to every parameter. The linear path reads
each model's logit transform (Gemma 2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling)
from its config; a transform it does not know is an error naming the model. The attention
implementation "auto" picks what each model supports, and MoE models add their router's loss.
"""

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from helpers import max_scaled_err, rel_err  # noqa: E402
from safedpo.collate import collate_packed, collate_padded  # noqa: E402
from safedpo.data import Example  # noqa: E402
from safedpo.model import PolicyLogps, causal_lm_class, check_transformers, pick_attn_implementation  # noqa: E402
from safedpo_kernels import reference  # noqa: E402
from safedpo_kernels.integrations.hf import logit_transform, router_config  # noqa: E402
from safedpo_kernels.options import LossOptions  # noqa: E402
from safedpo_kernels.transform import LogitTransform  # noqa: E402

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
    logps = PolicyLogps(model, loss_input, backend="torch")(batch)
    (logps * upstream).sum().backward()
    return logps.detach(), grads(model)


@pytest.mark.parametrize("name", list(ARCHS))
def test_log_probs_and_gradients_match_the_models_logits(name):
    model = build(name)
    padded, packed = batch_of()
    upstream = torch.tensor([0.7, -1.3, 0.4, 1.1, -0.6, 0.9])
    want_logps, want_grads = oracle(model, padded, upstream)
    for loss_input in ("logits", "linear", "eager"):
        for layout, batch in (("padded", padded), ("packed", packed)):
            got_logps, got_grads = ours(model, loss_input, batch, upstream)
            assert max_scaled_err(got_logps, want_logps) <= 1e-5, (loss_input, layout)
            assert rel_err(got_grads, want_grads) <= 1e-5, (loss_input, layout)


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text", "cohere", "granite"])
def test_the_transform_is_read_from_the_config_and_matters(name):
    model = build(name)
    transform = logit_transform(model)
    assert transform != LogitTransform()
    padded, _ = batch_of()
    with torch.no_grad():
        right = PolicyLogps(model, "linear", backend="torch")(padded)
        wrong = PolicyLogps(model, "logits", backend="torch")  # a check that the transform changes the result:
        plain = reference.sequence_logps(reference.linear_logits(
            model.get_decoder()(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).last_hidden_state,
            model.get_output_embeddings().weight), padded["labels"])
        assert max_scaled_err(wrong(padded), right) <= 2e-5
    assert max_scaled_err(plain, right) > 1e-2  # without the transform the log-probs would be wrong


def test_peft_on_the_lm_head():
    """LoRA on the LM head lives outside ``head.weight``: the fused-linear path refuses it (at set-up, while
    the new adapter still does nothing) instead of leaving it out. A head in ``modules_to_save`` is a full
    trainable copy: linear equals logits with the adapters on and off, gradients too."""
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="LM head carries PEFT adapters.*target_modules"):
        PolicyLogps(lora, "linear")
    PolicyLogps(lora, "logits")

    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                modules_to_save=["lm_head"]))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # as after training: the adapters and the saved head differ from the base
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    padded, _ = batch_of()
    upstream = torch.tensor([0.7, -1.3, 0.4, 1.1, -0.6, 0.9])
    want = ours(model, "logits", padded, upstream)
    got = ours(model, "linear", padded, upstream)
    assert max_scaled_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5
    with model.disable_adapter(), torch.no_grad():
        base = PolicyLogps(model, "logits", backend="torch")(padded)
        assert max_scaled_err(PolicyLogps(model, "linear", backend="torch")(padded), base) <= 1e-5
        assert max_scaled_err(base, want[0]) > 1e-2


def test_an_unknown_logit_transform_is_a_clear_error():
    model = build("llama")

    class DoubledLogits(type(model)):  # a model that does something the kernels do not know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    model.__class__ = DoubledLogits
    with pytest.raises(ValueError, match="DoubledLogits.*loss_input: logits"):
        PolicyLogps(model, "linear")
    PolicyLogps(model, "logits")  # the logits path takes whatever the model returns


@pytest.mark.parametrize("name", list(ARCHS))
def test_auto_attention_computes_the_models_own_attention(name):
    """"auto" takes SDPA where the model supports it and it computes the same function as the eager
    attention: Gemma 2 soft-caps its attention scores, which SDPA cannot (transformers 5.17 marks it
    SDPA-capable and drops the cap), so it stays eager; the logits of a padded batch equal eager's."""
    model = build(name)
    expected = "eager" if name == "gemma2" else "sdpa"
    assert model.config._attn_implementation == expected
    eager = build(name, "eager")
    padded, _ = batch_of()
    inputs = dict(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])
    with torch.no_grad():
        assert max_scaled_err(model(**inputs).logits, eager(**inputs).logits) <= 1e-5


def test_sdpa_for_a_soft_capped_attention_is_refused():
    """Asked for by name, or a model loaded elsewhere with SDPA (TRL's default in some transformers
    releases): the trainer's and TRL's way to the loss both refuse it, naming the fix."""
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        build("gemma2", "sdpa")
    model = build("gemma2")
    model.config._attn_implementation = "sdpa"
    for loss_input in ("logits", "linear"):
        with pytest.raises(ValueError, match="attn_implementation='eager'"):
            PolicyLogps(model, loss_input)


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral"])
def test_router_aux_loss_is_the_models_own(name):
    """The linear path (decoder only) computes the same load-balancing loss as the model's forward."""
    model = build(name)
    assert router_config(model)["coef"] == 0.02
    padded, _ = batch_of()
    ref = torch.zeros(6)
    outs = {}
    for loss_input in ("logits", "linear"):
        policy = PolicyLogps(model, loss_input, backend="torch", router_aux=True)
        outs[loss_input] = policy(padded, loss=LossOptions(reduction="sum"), ref_logps=ref)
    want = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], output_router_logits=True).aux_loss
    for out in outs.values():
        assert out.aux_loss is not None and torch.allclose(out.aux_loss, want, rtol=1e-6)
    assert max_scaled_err(outs["linear"].result.loss, outs["logits"].result.loss) <= 1e-5


def test_a_transformers_older_than_the_tested_floor_is_refused():
    """transformers 4.56 gave packed batches wrong log-probs under SDPA: the trainer names its floor."""
    with pytest.raises(ImportError, match=r"transformers >= 5\.17 \(this is 4\.56\.2"):
        check_transformers("4.56.2")
    check_transformers("5.17.0")
    check_transformers(transformers.__version__)  # the installed one passes


def test_compile_context_follows_the_hub_kernel_wrappers():
    """compile_context sets dynamo's skip-side-effects-in-recomputation flag inside the context only, and
    only for a model whose layers carry the kernels package's per-instance wrappers (transformers >= 5.25
    with kernels installed); any other model gets a null context."""
    import torch._dynamo

    from safedpo_kernels._env import major_minor
    from safedpo_kernels.integrations.hf import compile_context, uses_hub_kernel_funcs

    flag = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    model = build("llama")
    wrapped = uses_hub_kernel_funcs(model)
    has_kernels = transformers.utils.import_utils.is_kernels_available()
    if not has_kernels:
        assert not wrapped
    elif major_minor(transformers.__version__) >= (5, 25):  # Llama's attention routes its rotary embedding through them
        assert wrapped
    assert not uses_hub_kernel_funcs(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    before = getattr(torch._dynamo.config, flag)
    for _ in range(2):  # the context is entered once per training step
        with compile_context(model):
            assert getattr(torch._dynamo.config, flag) == (wrapped or before)
        assert getattr(torch._dynamo.config, flag) == before
    with compile_context(torch.nn.Linear(2, 2)):
        assert getattr(torch._dynamo.config, flag) == before
