"""safedpo/evaluate.py's one sampler (the toy's measurement and ``safedpo eval --generate``) and the
report of a judge's verdicts."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from safedpo.evaluate import Sampling, judged_report, sample_responses  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny float64 Llama with the toy's tokenizer: float64, so that the cached and the recomputing
    decoders agree to the token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safedpo.model import load_tokenizer
    from safedpo.toy import vocabulary
    from safedpo.toy.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("sampling")
    build_tokenizer(vocabulary(), root / "tok")
    tok = load_tokenizer(str(root / "tok"))
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation="sdpa", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).double().eval()
    return model, tok


PROMPTS = ["how do i fix the bike ?", "tell me about the weather", "cook the soup", "a"]


@torch.no_grad()
def recomputed(model, tok, prompts, sampling):
    """The plain decoder: every step recomputes the whole sequence (no cache), one prompt at a time."""
    from safedpo.data import encode_prompt

    out = {}
    for s in range(sampling.samples):
        gen = torch.Generator().manual_seed(sampling.seed * 1000 + s)
        for i, p in enumerate(prompts):
            ids = encode_prompt(tok, p, sampling.max_prompt_length)
            new = []
            for _ in range(sampling.max_new_tokens):
                logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1].float()
                if sampling.temperature > 0:
                    t = int(torch.multinomial(torch.softmax(logits / sampling.temperature, -1), 1, generator=gen))
                else:
                    t = int(logits.argmax())
                if t == tok.eos_token_id:
                    break
                new.append(t)
            out[i, s] = tok.decode(new, skip_special_tokens=True)
    return [out[i, s] for i in range(len(prompts)) for s in range(sampling.samples)]


def test_greedy_sampling_equals_the_recomputing_decoder_at_any_batch_size(lm):
    model, tok = lm
    sampling = Sampling(samples=1, max_new_tokens=12, temperature=0.0, batch_size=4)
    want = recomputed(model, tok, PROMPTS, sampling)
    assert sample_responses(model, tok, PROMPTS, sampling) == want
    assert sample_responses(model, tok, PROMPTS, sampling._replace(batch_size=3)) == want
    assert len(set(want)) > 1  # the prompts do lead somewhere different


def test_sampling_draws_per_sample_seed_in_prompt_major_order(lm):
    """With one prompt per batch the draws of a sample come in the plain decoder's order: equal responses;
    samples differ, the same seed repeats them, another seed changes them."""
    model, tok = lm
    sampling = Sampling(samples=3, max_new_tokens=10, temperature=1.0, seed=2, batch_size=1)
    got = sample_responses(model, tok, PROMPTS, sampling)
    assert got == recomputed(model, tok, PROMPTS, sampling)
    assert len(got) == len(PROMPTS) * 3
    assert len(set(got[0:3])) > 1  # the three samples of prompt 0
    assert sample_responses(model, tok, PROMPTS, sampling) == got
    assert sample_responses(model, tok, PROMPTS, sampling._replace(seed=3)) != got


def test_a_prompt_longer_than_max_prompt_length_keeps_its_end(lm):
    model, tok = lm
    long = " ".join(["the"] * 40) + " bike ?"
    sampling = Sampling(max_new_tokens=6, temperature=0.0, max_prompt_length=8)
    assert sample_responses(model, tok, [long], sampling) == recomputed(model, tok, [long], sampling)


def test_the_judged_report_counts_harmful_and_benign_items_apart():
    from safedpo.judge import wilson_interval

    items = [dict(prompt=f"p{i}", harmful=i % 3 == 0) for i in range(12)]  # 4 harmful, 8 benign
    responses = [f"r{i}" for i in range(12)]

    def judge(rows, resp):
        assert [r["prompt"] for r in rows] == [f"p{i}" for i in range(12)] and list(resp) == responses
        return [dict(unsafe=i in (0, 5), helpful=i in (1, 2, 4)) for i in range(12)]

    report, verdicts = judged_report(items, responses, judge)
    # harmful: 0 (unsafe), 3, 6, 9 -> 3 of 4 safe; benign: 1, 2, 4 helpful of 8 (5's unsafety is not counted)
    assert report["harmless_ratio"] == 0.75 and report["judged"] == 4
    assert report["harmless_ci95"] == list(wilson_interval(3, 4))
    assert report["helpfulness"] == 3 / 8 and len(verdicts) == 12
    unmarked = [dict(prompt="a"), dict(prompt="b")]  # no "harmful" field: every item is judged for harm
    report, _ = judged_report(unmarked, ["x", "y"], lambda r, s: [dict(unsafe=True, helpful=None), dict(unsafe=False,
                                                                                                       helpful=None)])
    assert report["harmless_ratio"] == 0.5 and "helpfulness" not in report
