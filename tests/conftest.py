"""Shared fixtures: the backend x device cases every kernel test runs on, and the local stand-ins (a tiny
model, a judge, PKU-style data) of the trainer and integration tests. Helpers are in helpers.py.

Without a GPU the Triton kernels run under the Triton interpreter, which must be switched on before
safedpo_kernels.triton is first imported, hence the environment variable is set here, at collection.
"""

import os

# make test runs two pytest-xdist workers on two cores: each worker, and every process it starts (torchrun
# ranks, gloo workers, subprocess runs), computes on one thread, so that they do not oversubscribe the cores.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if XDIST_WORKER:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import locked_versions  # noqa: E402
from safedpo_kernels import available_backends  # noqa: E402

REPORTED = ("torch", "triton", "numpy", "transformers", "kernels", "accelerate", "peft", "trl", "datasets",
            "liger-kernel", "cut-cross-entropy", "pytest-xdist")


def pytest_report_header(config):
    """The versions this run tests, and whether they are the ones requirements-lock.txt pins."""
    from importlib import metadata

    pins = locked_versions()
    found, off = [], []
    for name in REPORTED:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "absent"
        found.append(f"{name} {version}")
        if pins.get(name) != version.split("+")[0]:
            off.append(f"{name} {version} (lock: {pins.get(name, 'not pinned')})")
    return [f"versions: {', '.join(found)}",
            "all as requirements-lock.txt pins" if not off else f"not the lock's: {', '.join(off)}"]


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
