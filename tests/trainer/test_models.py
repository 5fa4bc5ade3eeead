"""The trainer's models: for each real architecture (tests/tiny_archs.py) the policy's sequence log-probs
through the trainer's PairScorer with loss_input logits, linear and eager, padded and packed, equal the
log-probs computed from ``model(input_ids).logits`` by the float64 reference, and so do their gradients
with respect to every parameter. The attention implementation "auto" picks what each model supports,
and the trainer names the transformers floor it is tested with.
"""

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from helpers import max_scaled_err, rel_err  # noqa: E402
from safedpo.model import PairScorer, check_transformers  # noqa: E402
from tiny_archs import ARCHS, batch_of, build, oracle, ours  # noqa: E402


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
            PairScorer(model, loss_input)


def test_a_transformers_older_than_the_tested_floor_is_refused():
    """transformers 4.56 gave packed batches wrong log-probs under SDPA: the trainer names its floor."""
    with pytest.raises(ImportError, match=r"transformers >= 5\.17 \(this is 4\.56\.2"):
        check_transformers("4.56.2")
    check_transformers("5.17.0")
    check_transformers(transformers.__version__)  # the installed one passes
