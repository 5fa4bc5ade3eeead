"""The toy task on disk that the trainer's run tests share (train.jsonl, test.jsonl, the toy tokenizer),
written once per test module."""

import pytest


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    from tiny_runs import task_files

    return task_files(tmp_path_factory.mktemp("task"))
