"""Every misuse raises the promised exception (ValueError or TypeError), naming the argument."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import make_labels, make_logits, max_scaled_err
from safedpo_kernels import SafeDPOLoss, reference, safedpo_loss, sequence_logps

B, T, V = 2, 5, 50


@pytest.fixture
def good():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * B, T, V, generator=gen)
    labels = torch.randint(0, V, (2 * B, T), generator=gen)
    ref = torch.randn(2 * B, generator=gen)
    cs = torch.tensor([True, False])
    rs = torch.tensor([False, False])
    return logits, labels, ref, cs, rs


def loss(good, **changes):
    args = dict(zip(["logits", "labels", "ref_logps", "chosen_safe", "rejected_safe"], good))
    kw = {k: changes.pop(k) for k in list(changes) if k not in args}
    args.update(changes)
    kw.setdefault("backend", "torch")
    return safedpo_loss(*args.values(), **kw)


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (dict(labels=torch.zeros(2 * B, T + 1, dtype=torch.long)), ValueError, ["labels", "shape"]),
        (dict(ref_logps=torch.zeros(B)), ValueError, ["ref_logps", "(4,)"]),
        (dict(ref_logps=torch.zeros(2 * B, 1)), ValueError, ["ref_logps"]),
        (dict(chosen_safe=torch.ones(2 * B, dtype=torch.bool)), ValueError, ["chosen_safe", "(2,)"]),
        (dict(rejected_safe=torch.ones(1, dtype=torch.bool)), ValueError, ["rejected_safe"]),
        (dict(rejected_safe=torch.tensor([0, 2])), ValueError, ["rejected_safe", "0/1"]),
        (dict(chosen_safe=torch.tensor([0.0, 1.0])), TypeError, ["chosen_safe"]),
        (dict(ref_logps=torch.zeros(2 * B, dtype=torch.long)), TypeError, ["ref_logps"]),
        (dict(logits=torch.zeros(2 * B, T, V, dtype=torch.long)), TypeError, ["logits"]),
        (dict(logits=torch.zeros(2 * B, T, V, dtype=torch.float64)), TypeError, ["logits", "float32"]),
        (dict(labels=torch.zeros(2 * B, T)), TypeError, ["labels"]),
        (dict(logits=torch.zeros(2 * B * T, V)), ValueError, ["logits", "cu_seqlens"]),
        (dict(logits=torch.zeros(2 * B, T)), ValueError, ["logits"]),
        (dict(beta=0.0), ValueError, ["beta"]),
        (dict(delta=-1.0), ValueError, ["delta"]),
        (dict(beta=float("inf")), ValueError, ["beta", "finite"]),
        (dict(beta="0.1"), ValueError, ["beta", "real number"]),
        (dict(delta=float("nan")), ValueError, ["delta"]),
        (dict(label_smoothing=0.7), ValueError, ["label_smoothing"]),
        (dict(backend="cuda"), ValueError, ["backend"]),
        (dict(labels=torch.zeros(2 * B, T, dtype=torch.long, device="meta")), ValueError, ["labels", "device"]),
        (dict(ref_logps=torch.zeros(2 * B, device="meta")), ValueError, ["ref_logps", "device"]),
        (dict(chosen_safe=torch.zeros(B, dtype=torch.bool, device="meta")), ValueError, ["chosen_safe", "device"]),
        (dict(logits="not a tensor"), TypeError, ["logits"]),
    ],
)
def test_bad_loss_input(good, change, exc, words):
    with pytest.raises(exc) as info:
        loss(good, **change)
    for w in words:
        assert w in str(info.value)


def test_odd_n(good):
    logits, labels, *_ = good
    with pytest.raises(ValueError, match="odd N = 3"):
        safedpo_loss(logits[:3], labels[:3], torch.zeros(3), torch.ones(1), torch.ones(1))


def test_labels_out_of_range_named(good):
    logits, labels, *_ = good
    labels = labels.clone()
    labels[1, 3] = V
    labels[2, 0] = -5
    labels[0, 0] = -100
    with pytest.raises(ValueError) as info:
        sequence_logps(logits, labels)
    msg = str(info.value)
    assert "labels" in msg and "2 value(s)" in msg and "row 1, position 3" in msg and f"{V}" in msg


def test_custom_ignore_index_inside_vocab_is_allowed(good):
    logits, labels, *_ = good
    labels = labels.clone()
    labels[:, 0] = 0
    with_zero_ignored = sequence_logps(logits, labels, ignore_index=0)
    manual = labels.masked_fill(labels == 0, -100)
    assert torch.equal(with_zero_ignored, sequence_logps(logits, manual))


@pytest.mark.parametrize(
    "cu, words",
    [
        ([0, 3, 2, 10], "non-decreasing"),
        ([0, 4, 9], "end at total_tokens=10"),
        ([1, 4, 10], "start at 0"),
        ([[0, 10]], "1-D"),
    ],
)
def test_bad_cu_seqlens(cu, words):
    logits = torch.randn(10, V)
    labels = torch.randint(0, V, (10,))
    with pytest.raises(ValueError, match="cu_seqlens") as info:
        sequence_logps(logits, labels, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    assert words in str(info.value)


def test_cu_seqlens_wrong_dtype_and_layout():
    logits = torch.randn(10, V)
    labels = torch.randint(0, V, (10,))
    with pytest.raises(TypeError, match="cu_seqlens"):
        sequence_logps(logits, labels, cu_seqlens=torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match="labels"):
        sequence_logps(logits, labels[:9], cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="packed"):
        sequence_logps(logits.view(2, 5, V), labels.view(2, 5), cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))


def test_module_rejects_bad_hparams():
    with pytest.raises(ValueError, match="beta"):
        SafeDPOLoss(beta=-1.0)
    with pytest.raises(ValueError, match="backend"):
        SafeDPOLoss(backend="tpu")


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch\n"
        "from safedpo_kernels import sequence_logps\n"
        "try:\n"
        "    sequence_logps(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "RAISED" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


def test_triton_interpreter_with_a_numpy_it_cannot_run_is_a_clear_error(monkeypatch):
    """triton < 3.7's interpreter fails inside every kernel loop with numpy >= 2.4 (a bare TypeError
    from deep in triton): the backend refuses up front, naming both versions and the way out."""
    triton_backend = pytest.importorskip("safedpo_kernels.triton")

    if not triton_backend.INTERPRETED:
        pytest.skip("the Triton interpreter is off")
    problem = triton_backend.interpreter_problem
    assert problem("3.6.0", "2.4.6") and "numpy<2.4" in problem("3.6.0", "2.4.6")
    assert problem("3.3.1", "2.5.0rc1")
    assert not problem("3.6.0", "2.3.5") and not problem("3.7.0", "2.4.6") and not problem("3.9.0", "2.5.1")
    monkeypatch.setattr(triton_backend.triton, "__version__", "3.6.0")
    monkeypatch.setattr(triton_backend.numpy, "__version__", "2.4.6")
    with pytest.raises(RuntimeError, match=r"triton 3\.6\.0 cannot run with numpy 2\.4\.6"):
        sequence_logps(torch.randn(2, 3, V), torch.zeros(2, 3, dtype=torch.long), backend="triton")


@pytest.mark.parametrize(
    "backend, name, value",
    [
        ("triton", "SAFEDPO_TRITON_TILE", "-1"),
        ("triton", "SAFEDPO_TRITON_BLOCK_V", "0"),
        ("triton", "SAFEDPO_TRITON_BLOCK_V", "100"),
        ("triton", "SAFEDPO_TRITON_NUM_WARPS", "3"),
        ("torch", "SAFEDPO_CHUNK_BYTES", "lots"),
        ("torch", "SAFEDPO_CHUNK_BYTES", "0"),
    ],
)
def test_bad_tuning_variable_is_named(monkeypatch, backend, name, value):
    """A malformed tile or chunk size is an error naming the variable, never inf, NaN or a crash."""
    from safedpo_kernels.dispatch import triton_available

    if backend == "triton" and not triton_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        sequence_logps(torch.randn(2, 3, V), torch.zeros(2, 3, dtype=torch.long), backend=backend)


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
