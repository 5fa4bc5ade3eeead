"""compile: true: the compiled policy trains as the eager one with no graph break of ours (activation
checkpointing too), the policy breaks the graph only when it validates, and token ids past the model's
vocabulary are refused when the data is loaded."""


import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from tiny_runs import config, losses  # noqa: E402


@pytest.mark.parametrize("compile_backend, loss_input, checkpointing",
                         [("aot_eager", "logits", True), ("aot_eager", "linear", True), ("inductor", "linear", False)])
def test_a_compiled_policy_trains_as_the_eager_one(task, tmp_path, compile_backend, loss_input, checkpointing):
    """compile: true (torch.compile of the policy's forward and the loss) gives the eager run's losses, and
    the tiny Llama's step compiles without a graph break (the kernels' value checks are off; the token ids
    were checked when the data was loaded), with activation checkpointing too (transformers >= 5.25 with
    the kernels package wraps every attention layer's forward in a set-and-restore of a global, which
    dynamo refuses inside the checkpoint's higher-order op unless the step runs under compile_context)."""
    from torch._dynamo.utils import counters

    from safedpo.train import train

    train(config(task, tmp_path / "eager", max_steps=2, loss_input=loss_input))
    counters.clear()
    train(config(task, tmp_path / "compiled", max_steps=2, loss_input=loss_input, compile=True,
                 compile_backend=compile_backend, gradient_checkpointing=checkpointing))
    assert not counters["graph_break"], dict(counters["graph_break"])
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(a) == len(b) == 2 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)


@pytest.mark.parametrize("loss_input", ["logits", "linear"])
def test_the_policy_breaks_the_graph_only_when_it_validates(loss_input):
    """validate=False (what compile: true sets): one graph for the tiny Llama's forward and the loss;
    validate=True: the kernels' label and flag checks read values on the host, breaking it."""
    import torch._dynamo
    from transformers import LlamaConfig, LlamaForCausalLM

    from safedpo.model import PairScorer
    from safedpo_kernels.options import LossOptions

    gen = torch.Generator().manual_seed(5)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa"))
    ids = torch.randint(0, 97, (4, 9), generator=gen)
    labels = ids.masked_fill(torch.arange(9) < 3, -100)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, chosen_safe=torch.tensor([1, 0]),
                 rejected_safe=torch.tensor([0, 0]))
    breaks = {}
    for validate in (True, False):
        torch._dynamo.reset()
        policy = PairScorer(model, loss_input, validate=validate)
        explained = torch._dynamo.explain(policy)(batch, LossOptions(), torch.zeros(4))
        breaks[validate] = explained.graph_break_count
    assert breaks[False] == 0 and breaks[True] > 0, breaks


def test_token_ids_past_the_models_vocabulary_are_refused(task, tmp_path):
    """A tokenizer larger than the model (added tokens, no resize): one message before any step, naming
    the id and the vocabulary, instead of an index error inside the embedding."""
    from safedpo.train import train

    with pytest.raises(ValueError, match=r"the training data has token id \d+ but the model's vocabulary has 20 entries"):
        train(config(task, tmp_path / "small", max_steps=1, tiny_model={"vocab_size": 20}))
    assert not (tmp_path / "small" / "checkpoints").exists()
