"""The trainer's data: PKU-SafeRLHF rows read strictly (every file format, flags, ids, malformed rows named
or skipped), the modes' pairs, label noise, long texts cut before tokenizing."""

import json

import pytest

pytest.importorskip("transformers")

from safedpo.config import loss_flags  # noqa: E402
from safedpo.data import DataError, Pair, build_pairs, check_row, encode_pairs, flip_safety_labels, load_rows  # noqa: E402


def row(better=0, safer=0, safe0=True, safe1=True, **kw):
    r = dict(prompt="how do i fix the bike ?", response_0="a", response_1="b", is_response_0_safe=safe0,
             is_response_1_safe=safe1, better_response_id=better, safer_response_id=safer)
    r.update(kw)
    return r


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_modes_select_and_order_pairs():
    rows = [
        row(better=0, safer=0, safe0=True, safe1=False),  # preferred safe, other unsafe
        row(better=1, safer=0, safe0=True, safe1=False),  # preferred (1) unsafe, other safe
        row(better=0, safer=1, safe0=False, safe1=False),  # both unsafe
        row(better=1, safer=0, safe0=True, safe1=True),  # both safe
    ]
    helpful = build_pairs(rows, "dpo-helpful")
    assert [(p.chosen, p.rejected) for p in helpful] == [("a", "b"), ("b", "a"), ("a", "b"), ("b", "a")]
    assert [(p.chosen_safe, p.rejected_safe) for p in helpful] == [(True, False), (False, True), (False, False), (True, True)]
    assert [(p.chosen, p.rejected) for p in build_pairs(rows, "safedpo")] == [(p.chosen, p.rejected) for p in helpful]
    harmless = build_pairs(rows, "dpo-harmless")
    assert [(p.chosen, p.rejected) for p in harmless] == [("a", "b"), ("a", "b"), ("b", "a"), ("a", "b")]
    safebetter = build_pairs(rows, "dpo-safebetter")
    assert [(p.chosen, p.rejected, p.chosen_safe) for p in safebetter] == [("a", "b", True), ("b", "a", True)]
    assert loss_flags("safedpo", 5.0) == dict(delta=5.0, swap=True, drop_both_unsafe=True)
    assert loss_flags("noswap", 5.0) == dict(delta=5.0, swap=False, drop_both_unsafe=True)
    for mode in ("dpo-helpful", "dpo-harmless", "dpo-safebetter"):
        assert loss_flags(mode, 5.0) == dict(delta=0.0, swap=False, drop_both_unsafe=False)


def test_label_noise_is_seeded():
    rows = [row(safe0=bool(i % 2), safe1=bool(i % 3)) for i in range(400)]
    assert flip_safety_labels(rows, 0.0, 1) == rows
    flipped = flip_safety_labels(rows, 1.0, 1)
    flags = ("is_response_0_safe", "is_response_1_safe")
    assert all(all(f[k] != r[k] for k in flags) for f, r in zip(flipped, rows))
    a, b, c = (flip_safety_labels(rows, 0.2, s) for s in (7, 7, 8))
    assert a == b and a != c
    n = sum(x[k] != r[k] for x, r in zip(a, rows) for k in ("is_response_0_safe", "is_response_1_safe"))
    assert 100 <= n <= 220  # about 20% of 800 flags
    assert rows[0]["is_response_0_safe"] is False  # the input is not modified


@pytest.mark.parametrize(
    "bad, column, words",
    [
        (dict(response_1=""), "response_1", "non-empty string"),
        (dict(better_response_id=2), "better_response_id", "0 or 1"),
        (dict(is_response_0_safe="maybe"), "is_response_0_safe", "boolean"),
        (dict(safer_response_id=None), "safer_response_id", "missing"),
    ],
)
def test_malformed_rows_named_or_skipped(tmp_path, bad, column, words):
    path = write_jsonl(tmp_path / "d.jsonl", [row(), row(**bad), row()])
    with pytest.raises(DataError) as info:
        load_rows([path])
    msg = str(info.value)
    assert path in msg and "line 2" in msg and repr(column) in msg and words in msg  # the second line, as an editor counts
    rows, skipped = load_rows([path], skip_bad_rows=True)
    assert len(rows) == 2 and skipped == 1


def test_missing_column_and_remap(tmp_path):
    r = row()
    r["question"] = r.pop("prompt")
    path = write_jsonl(tmp_path / "d.jsonl", [r])
    with pytest.raises(DataError, match=r"line 1, column 'prompt': missing; the row has \['question'\]: map one with "
                                        r"columns: \{prompt: <its name>\}"):
        load_rows([path])
    rows, _ = load_rows([path], columns={"prompt": "question"})
    assert rows[0]["prompt"] == "how do i fix the bike ?"
    with pytest.raises(DataError, match="row 0"):
        check_row({}, "row 0")


def test_one_float_in_a_column_is_judged_on_its_own(tmp_path):
    rows = [row(safe1=False, prompt="p") for _ in range(8)]
    rows[5]["better_response_id"] = 1.0  # integral: fine
    loaded, _ = load_rows([write_jsonl(tmp_path / "a.jsonl", rows)])
    assert loaded[5]["better_response_id"] == 1 and loaded[0]["better_response_id"] == 0
    rows[5]["better_response_id"] = 0.5
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    with pytest.raises(DataError, match=r"line 6, column 'better_response_id': expected 0 or 1, got 0.5"):
        load_rows([path])
    kept, skipped = load_rows([path], skip_bad_rows=True)
    assert len(kept) == 7 and skipped == 1  # only that row, not the whole file


def test_flags_read_the_same_in_every_format(tmp_path):
    import csv

    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row(safe1=False, prompt="p")))
        w.writeheader()
        for safe0, safe1 in (("True", "no"), ("yes", "FALSE"), ("1", "0")):
            w.writerow(row(safe1=False, prompt="p", is_response_0_safe=safe0, is_response_1_safe=safe1, better_response_id="1"))
    loaded, _ = load_rows([str(path)])
    assert [(r["is_response_0_safe"], r["is_response_1_safe"]) for r in loaded] == [(True, False)] * 3
    assert all(r["better_response_id"] == 1 for r in loaded)
    jsonl = write_jsonl(tmp_path / "d.jsonl", [row(safe1=False, prompt="p", is_response_0_safe="1", is_response_1_safe="false")])
    assert load_rows([jsonl])[0][0]["is_response_0_safe"] is True
    bad = write_jsonl(tmp_path / "e.jsonl", [row(safe1=False, prompt="p"),
                                             row(safe1=False, prompt="p", is_response_1_safe="maybe")])
    with pytest.raises(DataError, match=r"e.jsonl, line 2, column 'is_response_1_safe'.*'maybe'"):
        load_rows([bad])
    path.write_text(path.read_text().replace("no", "nope", 1))  # a CSV names the row and its line (after the header)
    with pytest.raises(DataError, match=r"d.csv, row 1 \(line 2\), column 'is_response_1_safe'.*'nope'"):
        load_rows([str(path)])


def test_invalid_json_and_empty_files_are_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(row(safe1=False, prompt="p")) + "\n{not json\n")
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


