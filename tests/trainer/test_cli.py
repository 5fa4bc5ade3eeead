"""safedpo/cli.py in-process: each command's exit status and what it prints."""

import json

import pytest

from safedpo.cli import main


def test_toy_writes_the_task_and_names_its_files(tmp_path, capsys):
    assert main(["toy", "--out", str(tmp_path / "toy"), "--seed", "1"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert {"train", "test", "tokenizer"} <= set(paths)
    rows = [json.loads(line) for line in open(paths["train"])]
    assert rows and {"prompt", "response_0", "response_1", "is_response_0_safe", "better_response_id"} <= set(rows[0])


@pytest.mark.parametrize("argv, says", [
    (["train", "nope=1"], "unknown config key: nope"),
    (["train", "batch_size=0", "tiny_model={hidden_size: 8}", "train_files=x.jsonl"], "batch_size must be at least 1"),
    (["train", "--config", "/nonexistent/run.yaml"], "config file '/nonexistent/run.yaml' does not exist"),
    (["train", "nonfinite=ignore", "tiny_model={hidden_size: 8}", "train_files=x.jsonl"],
     "nonfinite must be one of ('error', 'skip')"),
])
def test_bad_input_is_one_line_and_status_2(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("safedpo: error: ") and says in err and err.count("\n") == 1, err


def test_eval_needs_data_and_a_checkpoint(tmp_path, capsys):
    base = ["eval", "tiny_model={hidden_size: 8}", "train_files=x.jsonl"]
    assert main(base) == 2 and "no evaluation data: set eval_files" in capsys.readouterr().err
    (tmp_path / "test.jsonl").write_text("")
    assert main([*base, f"eval_files={tmp_path / 'test.jsonl'}"]) == 2
    assert "checkpoint=" in capsys.readouterr().err
