"""Shared fixtures: the backend x device cases every kernel test runs on, and random SafeDPO batches.

Without a GPU the Triton kernels run under the Triton interpreter, which must be switched on before
safedpo_kernels.triton is first imported, hence the environment variable is set here, at collection.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from safedpo_kernels import available_backends, reference, sequence_logps  # noqa: E402


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


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (0 when both are 0)."""
    got, want = got.double(), want.double()
    denom = want.norm().item()
    diff = (got - want).norm().item()
    return diff / denom if denom else diff


def max_scaled_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max_i |got_i - want_i| / max(|want_i|, 1): relative for large values, absolute near 0."""
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()


# (outputs, gradients) tolerances per logits dtype, against float64: relative 1e-5 for float32; bf16/fp16
# outputs (accumulated in float32) 1e-4, their gradients (stored in bf16/fp16) 1e-2.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-4, 1e-2),
    torch.float16: (1e-4, 1e-2),
}


def logps_and_grad(logits, labels, upstream, **kw):
    """sequence_logps on a fresh leaf copy of logits, then backward of (out * upstream).sum():
    (out, d/d logits). Keywords go to sequence_logps."""
    x = logits.detach().clone().requires_grad_()
    out = sequence_logps(x, labels, **kw)
    (out * upstream).sum().backward()
    return out.detach(), x.grad


def float64_logps_and_grad(logits, labels, upstream, **kw):
    """The same from the float64 reference: the oracle of ``logps_and_grad``."""
    x = logits.detach().double().requires_grad_()
    out = reference.sequence_logps(x, labels, **kw)
    (out * upstream.double()).sum().backward()
    return out.detach(), x.grad


def make_logits(shape, dtype, device, gen, scale=3.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def make_labels(N, T, V, gen, device, prompt_max=3):
    """Random targets; a random-length prompt and random-length padding are ignored (-100), and row 1
    is fully ignored, as a fully truncated response would be."""
    labels = torch.randint(0, V, (N, T), generator=gen)
    for n in range(N):
        p = int(torch.randint(0, prompt_max + 1, (1,), generator=gen))
        pad = int(torch.randint(0, 3, (1,), generator=gen))
        labels[n, :p] = -100
        if pad:
            labels[n, T - pad :] = -100
    if N > 1:
        labels[1] = -100
    return labels.to(device)


def make_flags(B, gen, device):
    """(chosen_safe, rejected_safe): the first four pairs cover all four combinations."""
    base = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=torch.bool)
    flags = torch.randint(0, 2, (B, 2), generator=gen).bool()
    flags[: min(B, 4)] = base[: min(B, 4)]
    return flags[:, 0].to(device), flags[:, 1].to(device)


def pack(logits, labels, keep_lengths):
    """Padded (N, T, V) -> packed (total, V) keeping the first keep_lengths[n] tokens of each row."""
    cu = [0]
    for n_len in keep_lengths:
        cu.append(cu[-1] + n_len)
    packed = torch.cat([logits[n, :L] for n, L in enumerate(keep_lengths)])
    packed_labels = torch.cat([labels[n, :L] for n, L in enumerate(keep_lengths)])
    return packed, packed_labels, torch.tensor(cu, dtype=torch.int32, device=logits.device)


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
