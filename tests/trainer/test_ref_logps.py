"""The reference's log-probs (safedpo/ref_logps.py): a precomputed table gives each batch what the live
reference computes, packed or padded; the on-disk table is reused for the same model and data only; the
reference is a frozen copy of the initial policy, never the policy being trained."""

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from tiny_runs import config  # noqa: E402


def _parts(task, tmp_path):
    from safedpo.data import data_sources, load_examples
    from safedpo.distributed import Dist
    from safedpo.model import PairScorer, build_model, load_tokenizer

    cfg = config(task, tmp_path / "run")
    tok = load_tokenizer(task["tokenizer"])
    examples, _ = load_examples(cfg.data, tok, data_sources(cfg.data, "train"), 0)
    policy = PairScorer(build_model(cfg.model, len(tok), torch.device("cpu"), seed=1), "logits", backend="torch")
    return cfg, tok, examples[:7], policy, Dist("cpu")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_precomputed_table_gives_what_the_live_reference_computes(task, tmp_path, packed):
    from safedpo.collate import make_batch
    from safedpo.ref_logps import Precompute, ReferenceLogps

    cfg, tok, examples, policy, procs = _parts(task, tmp_path)
    sets = {"train": examples, "eval": examples[:3]}
    table = ReferenceLogps(cfg.loss, policy, sets, tok, procs, packed, Precompute(tmp_path / "cache", 3, False))
    live_section = dataclasses.replace(cfg.loss, reference="live")
    live = ReferenceLogps(live_section, policy, sets, tok, procs, packed, None)
    assert table.policy is None  # precomputed: no reference model is kept
    for idx in ([4, 0, 6], [1, 2]):  # out of order, and a batch of another size than the table's
        batch = make_batch(examples, idx, tok.pad_token_id, packed, torch.device("cpu"))
        got, want = table(batch), live(batch)
        assert got.shape == (2 * len(idx),) and torch.isfinite(want).all()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got, want)
    assert torch.allclose(table(make_batch(examples, [2], tok.pad_token_id, packed, torch.device("cpu")), "eval"),
                          live(make_batch(examples, [2], tok.pad_token_id, packed, torch.device("cpu"))), rtol=1e-5, atol=1e-4)


def test_the_table_is_reused_for_the_same_model_and_data_only(task, tmp_path, monkeypatch):
    from safedpo import ref_logps
    from safedpo.ref_logps import Precompute, ReferenceLogps

    cfg, tok, examples, policy, procs = _parts(task, tmp_path)
    pre = Precompute(tmp_path / "cache", 4, False)
    ReferenceLogps(cfg.loss, policy, {"train": examples}, tok, procs, False, pre)
    files = sorted((tmp_path / "cache").glob("ref-*.pt"))
    assert len(files) == 1
    calls = []
    real = ref_logps.compute_ref_logps
    monkeypatch.setattr(ref_logps, "compute_ref_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    ReferenceLogps(cfg.loss, policy, {"train": examples}, tok, procs, False, pre)
    assert calls == []  # the same weights and examples: read from disk
    ReferenceLogps(cfg.loss, policy, {"train": examples[:5]}, tok, procs, False, pre)
    with torch.no_grad():
        next(policy.parameters()).add_(0.01)
    ReferenceLogps(cfg.loss, policy, {"train": examples}, tok, procs, False, pre)
    assert calls == [1, 1]  # other examples, other weights: computed afresh, under their own keys
    assert len(list((tmp_path / "cache").glob("ref-*.pt"))) == 3
    # The same weights under another configuration compute other log-probs; where the model was loaded
    # from does not matter.
    config = policy.model.config
    config._name_or_path = str(tmp_path / "moved")
    ReferenceLogps(cfg.loss, policy, {"train": examples}, tok, procs, False, pre)
    assert calls == [1, 1]
    config.rms_norm_eps *= 100
    ReferenceLogps(cfg.loss, policy, {"train": examples}, tok, procs, False, pre)
    assert calls == [1, 1, 1]


def test_the_reference_is_a_frozen_copy_of_the_initial_policy(task, tmp_path):
    from safedpo.collate import make_batch
    from safedpo.ref_logps import ReferenceLogps

    cfg, tok, examples, policy, procs = _parts(task, tmp_path)
    live_section = dataclasses.replace(cfg.loss, reference="live")
    ref = ReferenceLogps(live_section, policy, {"train": examples}, tok, procs, False, None)
    batch = make_batch(examples, [0, 1], tok.pad_token_id, False, torch.device("cpu"))
    before = ref(batch)
    assert not before.requires_grad
    assert all(not p.requires_grad for p in ref.policy.parameters())
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.5)  # training the policy does not move its reference
    assert torch.equal(ref(batch), before)
    assert not torch.allclose(policy(batch).detach(), before)
