"""Shared fixtures: the backend x device cases every kernel test runs on, and the local stand-ins (a tiny
model, a judge, PKU-style data) of the trainer and integration tests. Helpers are in helpers.py.

Without a GPU the Triton kernels run under the Triton interpreter, which must be switched on before
safedpo_kernels.triton is first imported, hence the environment variable is set here, at collection.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from safedpo_kernels import available_backends  # noqa: E402


def _cases():
    """(backend, device) for every backend usable here; the Triton kernels run interpreted on the CPU."""
    devices = ["cpu"] + (["cuda"] if HAS_CUDA else [])
    cases = []
    for device in devices:
        for backend in available_backends(device):
            label = "interpret" if (backend, device) == ("triton", "cpu") else device
            cases.append(pytest.param((backend, device), id=f"{backend}-{label}"))
    return cases


CASES = _cases()


@pytest.fixture(params=CASES)
def case(request, monkeypatch):
    """(backend, device). Small chunk and tile sizes so that chunk/block boundaries are crossed."""
    monkeypatch.setenv("SAFEDPO_CHUNK_BYTES", str(4 * 1024 * 5))
    monkeypatch.setenv("SAFEDPO_TRITON_BLOCK_V", "128")
    monkeypatch.setenv("SAFEDPO_TRITON_TILE", "1024")
    monkeypatch.setenv("SAFEDPO_LINEAR_BLOCK_N", "32")
    monkeypatch.setenv("SAFEDPO_LINEAR_SPLITS", "3")
    monkeypatch.setenv("SAFEDPO_LINEAR_CHUNK_BYTES", str(4 * 1024 * 7))
    return request.param


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory):
    """Local stand-ins for real runs (nothing is downloaded): a tiny Llama saved with the toy task's
    tokenizer, a tiny sequence classifier, and the toy's PKU-style rows as jsonl files and as a saved
    DatasetDict (train / test)."""
    import json

    datasets = pytest.importorskip("datasets")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from safedpo.model import load_tokenizer
    from safedpo.toy.pipeline import write_task

    root = tmp_path_factory.mktemp("stand_ins")
    paths = write_task(root / "task", seed=5)
    tok = load_tokenizer(str(paths["tokenizer"]))
    small = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                 eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model_dir = root / "tiny-llama"
    LlamaForCausalLM(LlamaConfig(**small)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    judge_dir = root / "tiny-judge"
    LlamaForSequenceClassification(LlamaConfig(num_labels=1, **small)).save_pretrained(judge_dir)
    tok.save_pretrained(judge_dir)

    def rows(name, n):
        return [json.loads(line) for line in open(paths[name])][:n]

    train_jsonl = root / "train.jsonl"
    train_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows("train", 24)))
    data_dir = root / "pku-style"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows("train", 24)),
                          "test": datasets.Dataset.from_list(rows("test", 8))}).save_to_disk(str(data_dir))
    return dict(model=str(model_dir), judge=str(judge_dir), data=str(data_dir), train_jsonl=str(train_jsonl),
                paths=paths, root=root)
