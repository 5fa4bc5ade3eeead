"""What broke when the library was probed as an adversarial user would, each with the test that caught
it: hostile checkpoint files, malformed data and configs, reused output directories, crashes and full
disks while saving, in-place backward on a leaf, +inf logits, absurdly long texts. (The native build
lock and cache checks are in test_native.py, FSDP resume in test_trainer.py.)"""

import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from safedpo_kernels import linear_safedpo_loss, reference, safedpo_loss, sequence_logps
from conftest import make_flags, make_labels, make_logits, max_scaled_err, rel_err

pytest.importorskip("transformers")

from safedpo.config import load_config  # noqa: E402
from safedpo.data import DataError, encode_pairs, load_rows, Pair  # noqa: E402


class Exploit:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- 1. hostile files


@pytest.fixture
def old_torch_load_default(monkeypatch):
    """torch.load as torch < 2.6 (which pyproject allows) has it: weights_only=False unless passed, so a
    caller that relies on the default is caught on any installed torch."""
    real_load = torch.load

    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)


def _refused_without_running_code(run, marker):
    with pytest.raises(Exception) as info:
        run()
    assert not marker.exists(), "unpickling the file ran its code"
    assert info.type is pickle.UnpicklingError, info.value


def test_a_hostile_checkpoint_runs_no_code(stand_ins, tmp_path, old_torch_load_default):
    from safedpo.train import train

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil" / "step-1"
    ckpt.mkdir(parents=True)
    with open(ckpt / "state.pt", "wb") as f:
        pickle.dump({"model": Exploit(marker)}, f)
    (ckpt / "meta.json").write_text(json.dumps(dict(step=1, position=1, rng={})))
    cfg = load_config(None, model=stand_ins["model"], train_files=[stand_ins["train_jsonl"]], output_dir=str(tmp_path / "run"),
                      resume=str(ckpt), max_steps=2, batch_size=2, progress=False, max_length=48, max_prompt_length=24)
    _refused_without_running_code(lambda: train(cfg), marker)


def test_a_hostile_reference_cache_runs_no_code(stand_ins, tmp_path, old_torch_load_default):
    from safedpo.train import train

    marker = tmp_path / "pwned"
    kw = dict(model=stand_ins["model"], train_files=[stand_ins["train_jsonl"]], max_steps=1, batch_size=2, progress=False,
              max_length=48, max_prompt_length=24, cache_dir=str(tmp_path / "cache"))
    train(load_config(None, output_dir=str(tmp_path / "first"), **kw))
    cached = list((tmp_path / "cache").glob("ref-*.pt"))
    assert cached
    for path in cached:
        with open(path, "wb") as f:
            pickle.dump(Exploit(marker), f)
    _refused_without_running_code(lambda: train(load_config(None, output_dir=str(tmp_path / "second"), **kw)), marker)


# ----------------------------------------------------------------------------- 3. data


def row(**kw):
    r = dict(prompt="p", response_0="a", response_1="b", is_response_0_safe=True, is_response_1_safe=False,
             better_response_id=0, safer_response_id=0)
    r.update(kw)
    return r


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_one_float_in_a_column_is_judged_on_its_own(tmp_path):
    rows = [row() for _ in range(8)]
    rows[5]["better_response_id"] = 1.0  # integral: fine
    loaded, _ = load_rows([write_jsonl(tmp_path / "a.jsonl", rows)])
    assert loaded[5]["better_response_id"] == 1 and loaded[0]["better_response_id"] == 0
    rows[5]["better_response_id"] = 0.5
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    with pytest.raises(DataError, match=r"row 5, column 'better_response_id': expected 0 or 1, got 0.5"):
        load_rows([path])
    kept, skipped = load_rows([path], skip_bad_rows=True)
    assert len(kept) == 7 and skipped == 1  # only that row, not the whole file


def test_flags_read_the_same_in_every_format(tmp_path):
    import csv

    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row()))
        w.writeheader()
        for safe0, safe1 in (("True", "no"), ("yes", "FALSE"), ("1", "0")):
            w.writerow(row(is_response_0_safe=safe0, is_response_1_safe=safe1, better_response_id="1"))
    loaded, _ = load_rows([str(path)])
    assert [(r["is_response_0_safe"], r["is_response_1_safe"]) for r in loaded] == [(True, False)] * 3
    assert all(r["better_response_id"] == 1 for r in loaded)
    jsonl = write_jsonl(tmp_path / "d.jsonl", [row(is_response_0_safe="1", is_response_1_safe="false")])
    assert load_rows([jsonl])[0][0]["is_response_0_safe"] is True
    bad = write_jsonl(tmp_path / "e.jsonl", [row(), row(is_response_1_safe="maybe")])
    with pytest.raises(DataError, match=r"row 1, column 'is_response_1_safe'.*'maybe'"):
        load_rows([bad])


def test_invalid_json_and_empty_files_are_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(row()) + "\n{not json\n")
    with pytest.raises(DataError, match=r"x.jsonl, line 2: invalid JSON"):
        load_rows([str(path)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        load_rows([str(empty)])


def test_absurdly_long_texts_are_cut_before_tokenizing(stand_ins):
    from safedpo.model import load_tokenizer

    class Spy:
        """The tokenizer, recording the length of every text it is asked to tokenize."""

        def __init__(self, tok):
            self.tok, self.seen = tok, []

        def __getattr__(self, name):
            return getattr(self.tok, name)

        def __call__(self, text, **kwargs):
            self.seen.append(len(text))
            return self.tok(text, **kwargs)

    tok = Spy(load_tokenizer(stand_ins["model"]))
    huge = "word " * 2_000_000  # 10 MB
    (example,) = encode_pairs([Pair(huge, huge, "short", True, True)], tok, max_prompt_length=16, max_length=48)
    assert max(tok.seen) < 10_000
    assert len(example.prompt_ids) == 16 and len(example.prompt_ids) + len(example.chosen_ids) <= 48


# ----------------------------------------------------------------------------- 4. config


@pytest.mark.parametrize(
    "values, words",
    [
        (dict(batch_size=0), "batch_size must be at least 1"),
        (dict(grad_accum=0), "grad_accum must be at least 1"),
        (dict(max_length=0), "max_length must be at least 1"),
        (dict(max_prompt_length=-3), "max_prompt_length must be at least 1"),
        (dict(save_every=-1), "save_every must be >= 0"),
        (dict(eval_every=-2), "eval_every must be >= 0"),
        (dict(device="tpu"), "device must be one of"),
        (dict(progress="no"), "progress expects true or false"),
        (dict(lr="fast"), "lr expects a number"),
        (dict(batch_size=2.5), "batch_size expects an integer"),
        (dict(train_files=[1, 2]), "train_files expects a list of strings"),
        (dict(beta=float("inf")), "beta expects a finite number"),
    ],
)
def test_config_values_are_checked_by_key(values, words):
    base = dict(tiny_model={"hidden_size": 8}, train_files=["x.jsonl"])
    with pytest.raises(ValueError, match=words):
        load_config(None, **{**base, **values}).validate()


def test_config_accepts_numbers_in_any_yaml_spelling(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-6\nbeta: 1\nmax_steps: '10'\ntrain_files: a.jsonl\ntiny_model: {hidden_size: 8}\n")
    cfg = load_config(str(path)).validate()
    assert (cfg.lr, cfg.beta, cfg.max_steps, cfg.train_files) == (5e-6, 1.0, 10, ["a.jsonl"])


def test_a_missing_model_is_one_clear_line(tmp_path):
    from safedpo.model import load_tokenizer

    with pytest.raises(FileNotFoundError, match=r"tokenizer '.*/nope': no such local directory$"):
        load_tokenizer(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- 5, 6. output directory, checkpoints


def run_cfg(stand_ins, out, **kw):
    base = dict(model=stand_ins["model"], train_files=[stand_ins["train_jsonl"]], output_dir=str(out), max_steps=3,
                batch_size=2, progress=False, max_length=48, max_prompt_length=24, cache_dir=str(out.parent / "cache"))
    return load_config(None, **{**base, **kw})


def steps_in(out):
    return [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "event" not in r]


def test_a_fresh_run_refuses_another_runs_directory(stand_ins, tmp_path):
    from safedpo.train import train

    out = tmp_path / "run"
    train(run_cfg(stand_ins, out, max_steps=2))
    with pytest.raises(ValueError, match="holds another run.*overwrite_output_dir"):
        train(run_cfg(stand_ins, out, resume="none"))
    train(run_cfg(stand_ins, out, resume="none", overwrite_output_dir=True))
    assert steps_in(out) == [1, 2, 3]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-3"]


def test_resume_truncates_the_metrics_and_keeps_k_checkpoints(stand_ins, tmp_path):
    from safedpo.train import train

    out = tmp_path / "run"
    train(run_cfg(stand_ins, out, max_steps=6, save_every=1, save_total_limit=2, stop_at_step=4))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-3", "step-4"]
    # A crash after step 4 was logged but before step 4... was saved: pretend step 5 was logged too.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(dict(step=5, loss=1.0)) + "\n")
    (out / "checkpoints" / ".tmp-step-5-123").mkdir()  # a crash mid-save
    train(run_cfg(stand_ins, out, max_steps=6, save_every=1, save_total_limit=2, resume="auto"))
    assert steps_in(out) == [1, 2, 3, 4, 5, 6]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-5", "step-6"]


def test_a_full_disk_is_named_and_the_last_checkpoint_stays(stand_ins, tmp_path, monkeypatch):
    from safedpo import checkpoint
    from safedpo.train import train

    out = tmp_path / "run"
    train(run_cfg(stand_ins, out, max_steps=2))
    real_save = torch.save

    def full(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError, match=r"disk full while writing .*step-4.*intact \(step-2\)"):
        train(run_cfg(stand_ins, out, max_steps=4, resume="auto"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    train(run_cfg(stand_ins, out, max_steps=4, resume="auto"))  # the last complete checkpoint still resumes
    assert steps_in(out) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- 7. in-place backward on a leaf


def test_inplace_backward_on_a_leaf_reuses_its_memory(case):
    backend, device = case
    gen = torch.Generator().manual_seed(70)
    logits = make_logits((3, 6, 97), torch.float32, device, gen)
    labels = make_labels(3, 6, 97, gen, device)
    xd = logits.double().requires_grad_()
    reference.sequence_logps(xd, labels).sum().backward()
    leaf = logits.clone().requires_grad_()
    sequence_logps(leaf, labels, inplace_backward=True, backend=backend).sum().backward()
    assert leaf.grad.data_ptr() == leaf.data_ptr()  # no copy: the gradient lives in the logits' memory
    assert rel_err(leaf.grad, xd.grad) <= 1e-5


def test_a_second_backward_through_an_inplace_graph_raises(case):
    backend, device = case
    gen = torch.Generator().manual_seed(71)
    logits = make_logits((2, 5, 64), torch.float32, device, gen).requires_grad_()
    labels = make_labels(2, 5, 64, gen, device)
    work = logits * 1
    out = sequence_logps(work, labels, inplace_backward=True, backend=backend).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize("entry", ["sequence_logps", "safedpo_loss", "linear_safedpo_loss"])
def test_double_backward_is_a_clear_error(case, entry):
    backend, device = case
    gen = torch.Generator().manual_seed(72)
    labels = make_labels(2, 5, 40, gen, device)
    cs, rs = make_flags(1, gen, device)
    if entry == "linear_safedpo_loss":
        x = torch.randn(2, 5, 8, generator=gen).to(device).requires_grad_()
        w = torch.randn(40, 8, generator=gen).to(device)
        out = linear_safedpo_loss(x, w, labels, torch.zeros(2, device=device), cs, rs, backend=backend).loss
    else:
        x = make_logits((2, 5, 40), torch.float32, device, gen).requires_grad_()
        out = (sequence_logps(x, labels, backend=backend).sum() if entry == "sequence_logps"
               else safedpo_loss(x, labels, torch.zeros(2, device=device), cs, rs, backend=backend).loss)
    with pytest.raises(RuntimeError, match="first-order gradients only.*create_graph"):
        torch.autograd.grad(out, x, create_graph=True)
    (g,) = torch.autograd.grad(out, x)  # a first-order backward of the same graph still works
    assert torch.isfinite(g).all()


# ----------------------------------------------------------------------------- 8. consistency


def test_a_plus_inf_logit_gives_nan_on_every_backend(case):
    backend, device = case
    gen = torch.Generator().manual_seed(73)
    logits = make_logits((3, 4, 50), torch.float32, device, gen)
    labels = make_labels(3, 4, 50, gen, device, prompt_max=0)
    labels[1] = 7
    logits[0, 2, 9] = float("inf")
    labels[0, 2] = 3  # a counted token whose row holds +inf
    out = sequence_logps(logits, labels, backend=backend)
    want = reference.sequence_logps(logits.double(), labels)
    assert torch.isnan(out[0]) and torch.isnan(want[0])
    assert max_scaled_err(out[1:], want[1:]) <= 1e-5


def test_cu_seqlens_as_a_python_list(case):
    backend, device = case
    gen = torch.Generator().manual_seed(74)
    logits = make_logits((9, 30), torch.float32, device, gen)
    labels = torch.randint(0, 30, (9,), generator=gen).to(device)
    a = sequence_logps(logits, labels, cu_seqlens=[0, 4, 9], backend=backend)
    b = sequence_logps(logits, labels, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32, device=device), backend=backend)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="cu_seqlens"):
        sequence_logps(logits, labels, cu_seqlens=[0, 4.5, 9], backend=backend)


# ----------------------------------------------------------------------------- mixed precision (autocast)


def _run_all(hidden, weight, logits, labels, ref, flags, backend, cast=None):
    """Every entry point's outputs and gradients, on fresh leaves; ``cast``: the dtype the head's
    operands are cast to (differentiably) before the fused-linear calls."""
    from safedpo_kernels import linear_sequence_logps

    h, w, x = (t.detach().clone().requires_grad_() for t in (hidden, weight, logits))
    seq = sequence_logps(x, labels, backend=backend)
    loss = safedpo_loss(x, labels, ref, *flags, backend=backend).loss
    (seq.sum() + loss).backward()
    def head():  # one cast per call, as autocast does
        return (h, w) if cast is None else (h.to(cast), w.to(cast))

    lin_seq = linear_sequence_logps(*head(), labels, backend=backend)
    lin = linear_safedpo_loss(*head(), labels, ref, *flags, softcap=20.0, backend=backend).loss
    (lin_seq.sum() + lin).backward()
    return [seq, loss, lin_seq, lin, x.grad, h.grad, w.grad]


def test_autocast_is_honoured_and_the_logits_stay_float32(case):
    """Inside a trainer's bf16 mixed precision (torch.autocast) the fused-linear functions take the head's
    operands in bf16, as autocast would give them to F.linear (float32 parameters still get float32
    gradients), and everything else is computed as outside it: the result equals the call outside
    autocast on operands cast to bf16. (The CPU backends' chunked matmuls gave bfloat16 logits under
    autocast -- log-probs off by ~|z| / 256 per token -- and the native backend raised.)"""
    backend, device = case
    gen = torch.Generator().manual_seed(21)
    B, T, V, H = 2, 6, 97, 16
    hidden = torch.randn(2 * B, T, H, generator=gen).to(device)
    weight = (torch.randn(V, H, generator=gen) / 2).to(device)
    logits = make_logits((2 * B, T, V), torch.bfloat16, device, gen)
    labels = make_labels(2 * B, T, V, gen, device)
    ref = torch.randn(2 * B, generator=gen).to(device)
    flags = make_flags(B, gen, device)
    want = _run_all(hidden, weight, logits, labels, ref, flags, backend, cast=torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = _run_all(hidden, weight, logits, labels, ref, flags, backend)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    assert got[5].dtype == got[6].dtype == torch.float32
    exact = _run_all(hidden, weight, logits, labels, ref, flags, backend)  # float32 operands, no autocast
    assert rel_err(got[2], exact[2]) > 0  # autocast did apply to the head's operands
