"""safedpo_kernels.integrations.hf on real architectures (tests/tiny_archs.py): the fused-linear path reads
each model's logit transform (Gemma 2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling)
from its config, and a transform it does not know, or a PEFT adapter on the LM head, is an error naming
the model; MoE models add their router's own load-balancing loss; compile_context follows the hub
kernels' wrappers.
"""

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from helpers import max_scaled_err, rel_err  # noqa: E402
from safedpo.model import PairScorer  # noqa: E402
from safedpo_kernels import reference  # noqa: E402
from safedpo_kernels.integrations.hf import logit_transform, router_config  # noqa: E402
from safedpo_kernels.options import LossOptions  # noqa: E402
from safedpo_kernels.transform import LogitTransform  # noqa: E402
from tiny_archs import batch_of, build, ours  # noqa: E402


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text", "cohere", "granite"])
def test_the_transform_is_read_from_the_config_and_matters(name):
    model = build(name)
    transform = logit_transform(model)
    assert transform != LogitTransform()
    padded, _ = batch_of()
    with torch.no_grad():
        right = PairScorer(model, "linear", backend="torch")(padded)
        wrong = PairScorer(model, "logits", backend="torch")  # a check that the transform changes the result:
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
        PairScorer(lora, "linear")
    PairScorer(lora, "logits")

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
        base = PairScorer(model, "logits", backend="torch")(padded)
        assert max_scaled_err(PairScorer(model, "linear", backend="torch")(padded), base) <= 1e-5
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
        PairScorer(model, "linear")
    PairScorer(model, "logits")  # the logits path takes whatever the model returns


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral"])
def test_router_aux_loss_is_the_models_own(name):
    """The linear path (decoder only) computes the same load-balancing loss as the model's forward."""
    model = build(name)
    assert router_config(model)["coef"] == 0.02
    padded, _ = batch_of()
    ref = torch.zeros(6)
    outs = {}
    for loss_input in ("logits", "linear"):
        policy = PairScorer(model, loss_input, backend="torch", router_aux=True)
        outs[loss_input] = policy(padded, loss=LossOptions(reduction="sum"), ref_logps=ref)
    want = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], output_router_logits=True).aux_loss
    for out in outs.values():
        assert out.aux_loss is not None and torch.allclose(out.aux_loss, want, rtol=1e-6)
    assert max_scaled_err(outs["linear"].result.loss, outs["logits"].result.loss) <= 1e-5


def test_a_router_loss_is_never_dropped_without_a_word(monkeypatch):
    """A mixture-of-experts config that declares no router_aux_loss_coef (DeepSeek-V3, GLM-4 MoE, ...) still
    has a router: its coefficient reads as 0.0 (as TRL reads it) and a trainer's own coefficient adds the
    model's load-balancing loss on both paths. A router loss asked of a model without a router, or one the
    model does not return, is a ValueError, never a silently missing term."""
    model = build("mixtral")
    del model.config.router_aux_loss_coef  # the class keeps a default: take that away too, for this test
    monkeypatch.delattr(type(model.config), "router_aux_loss_coef")
    assert not hasattr(model.config, "router_aux_loss_coef")
    router = router_config(model)
    assert router == dict(coef=0.0, num_experts=model.config.num_local_experts, top_k=model.config.num_experts_per_tok)
    padded, _ = batch_of()
    want = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], output_router_logits=True).aux_loss
    for loss_input in ("logits", "linear"):
        out = PairScorer(model, loss_input, backend="torch", router_aux=True)(padded, loss=LossOptions(), ref_logps=None)
        assert out.aux_loss is not None and torch.allclose(out.aux_loss, want, rtol=1e-6)
    llama = build("llama")
    assert router_config(llama) is None
    with pytest.raises(ValueError, match="router_aux: LlamaForCausalLM is not a mixture-of-experts model"):
        PairScorer(llama, "logits", router_aux=True)
    silent = PairScorer(model, "logits", backend="torch", router_aux=True)
    real_forward = model.forward
    model.forward = lambda **kw: real_forward(**{**kw, "output_router_logits": False})  # returns no router output
    with pytest.raises(ValueError, match="returned neither an aux_loss nor router logits"):
        silent(padded, loss=LossOptions(), ref_logps=None)


def test_compile_context_follows_the_hub_kernel_wrappers():
    """compile_context sets dynamo's skip-side-effects-in-recomputation flag inside the context only, and
    only for a model whose layers carry the kernels package's per-instance wrappers (transformers >= 5.25
    with kernels installed); any other model, or a torch without the flag, gets a null context."""
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
    supported = hasattr(torch._dynamo.config, flag)  # torch before 2.10 lacks it: then a null context
    before = getattr(torch._dynamo.config, flag, None)
    for _ in range(2):  # the context is entered once per training step
        with compile_context(model):
            assert getattr(torch._dynamo.config, flag, None) == ((wrapped and supported) or before)
        assert getattr(torch._dynamo.config, flag, None) == before
    with compile_context(torch.nn.Linear(2, 2)):
        assert getattr(torch._dynamo.config, flag, None) == before


def test_compile_context_is_null_on_a_torch_without_the_flag(monkeypatch):
    """Before torch 2.10 dynamo has no skip-side-effects flag: compile_context of a wrapped model is then a null
    context (the graph breaks at each checkpointed layer), not an AttributeError that stops the run."""
    import contextlib

    from safedpo_kernels.integrations import hf

    monkeypatch.setattr(hf, "uses_hub_kernel_funcs", lambda model: True)
    import torch._dynamo

    if hasattr(torch._dynamo.config, hf._SKIP_REPLAYED_SIDE_EFFECTS):
        assert not isinstance(hf.compile_context(torch.nn.Linear(2, 2)), contextlib.nullcontext)
    monkeypatch.setattr(hf, "_SKIP_REPLAYED_SIDE_EFFECTS", "a_flag_this_torch_does_not_have")
    assert isinstance(hf.compile_context(torch.nn.Linear(2, 2)), contextlib.nullcontext)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_every_loss_input_gives_the_same_token_statistics(name):
    """eager (the reference's statistics), logits and linear (the kernels', after the model's logit
    transform): the same loss and the same per-row TokenStats, padded and packed; they equal float64 on
    the model's own logits, the top-1 counts exactly."""
    model = build(name)
    padded, packed = batch_of()
    ref = torch.randn(6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits.double()
    want = reference.token_stats(logits, padded["labels"])
    for batch in (padded, packed):
        outs = {}
        for loss_input in ("eager", "logits", "linear"):
            with torch.no_grad():
                policy = PairScorer(model, loss_input, backend="torch", token_stats=True)
                outs[loss_input] = policy(batch, loss=LossOptions(delta=2.0), ref_logps=ref).result
        for loss_input, out in outs.items():
            stats = out.token_stats
            assert stats.top1.dtype == stats.tokens.dtype == torch.int64, loss_input
            assert torch.equal(stats.tokens, want[3].long()) and torch.equal(stats.top1, want[2].long()), loss_input
            assert max_scaled_err(stats.entropy, want[0]) <= 1e-5 and max_scaled_err(stats.mean_logit, want[1]) <= 1e-5
            assert max_scaled_err(out.loss, outs["eager"].loss) <= 1e-5, loss_input
