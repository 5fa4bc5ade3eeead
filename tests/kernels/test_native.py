"""Backend "native" specifics: thread-count independence and the build cache.

The numerical tests of every backend (test_sequence_logps, test_safedpo_loss, test_linear) run on
"native" too through the shared ``case`` fixture.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import make_labels, make_logits
from safedpo_kernels import sequence_logps
from safedpo_kernels.dispatch import native_available, resolve_backend

pytestmark = pytest.mark.skipif(not native_available(), reason="native extension not available")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_same_bits_for_one_and_two_threads(dtype):
    gen = torch.Generator().manual_seed(30)
    N, T, V = 6, 33, 1001
    logits = make_logits((N, T, V), dtype, "cpu", gen)
    labels = make_labels(N, T, V, gen, "cpu")
    upstream = torch.randn(N, generator=gen)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x = logits.clone().requires_grad_()
            out = sequence_logps(x, labels, backend="native")
            (out * upstream).sum().backward()
            results.append((out, x.grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_auto_picks_native_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "native"


def _load_in_fresh_process(env):
    code = "import json\nfrom safedpo_kernels import native\nprint(json.dumps(native.build_info()))"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_second_load_takes_no_build():
    env = dict(os.environ)
    first = _load_in_fresh_process(env)  # builds only if this cache is cold
    mtime = os.path.getmtime(first["library"])
    second = _load_in_fresh_process(env)
    assert first["ok"] and second["ok"]
    assert second["built"] is False
    assert second["library"] == first["library"]
    assert os.path.getmtime(second["library"]) == mtime


def test_disabled_by_environment():
    env = dict(os.environ, SAFEDPO_NATIVE="0")
    code = (
        "import torch\nfrom safedpo_kernels.dispatch import resolve_backend\n"
        "print(resolve_backend('auto', torch.device('cpu')))\n"
        "try:\n    resolve_backend('native', torch.device('cpu'))\nexcept RuntimeError as e:\n    print('RAISED', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "torch" and lines[1].startswith("RAISED") and "SAFEDPO_NATIVE=0" in lines[1]


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    """A cold cache and no usable compiler: one RuntimeWarning, and 'auto' gives 'torch'."""
    env = dict(os.environ, SAFEDPO_CACHE_DIR=str(tmp_path), CXX="/nonexistent/c++", CC="/nonexistent/cc")
    code = (
        "import warnings, torch\nwarnings.simplefilter('always')\n"
        "from safedpo_kernels.dispatch import resolve_backend\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = resolve_backend('auto', torch.device('cpu'))\n"
        "    b = resolve_backend('auto', torch.device('cpu'))\n"
        "print(a, b, sum('native CPU kernels are not available' in str(x.message) for x in w))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.stdout.strip().splitlines()[-1] == "torch torch 1", res.stdout + res.stderr


def _grad_of(logits, labels, upstream, **kw):
    x = logits.clone().requires_grad_()
    out = sequence_logps(x, labels, backend="native", **kw)
    (g,) = torch.autograd.grad((out * upstream).sum(), x)
    return out.detach(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_recycled_gradient_buffer_is_fully_overwritten(dtype):
    """A freed gradient buffer is handed to the next backward; stale contents (NaN here) never leak."""
    from safedpo_kernels import native
    from safedpo_kernels.reference import sequence_logps as ref_logps

    gen = torch.Generator().manual_seed(31)
    N, T, V = 3, 17, 517
    logits = make_logits((N, T, V), dtype, "cpu", gen)
    labels = make_labels(N, T, V, gen, "cpu")
    labels[1] = -100  # an all-ignored row: its gradient must be exact zeros, not stale bytes
    upstream = torch.randn(N, generator=gen)
    native.empty_cache()
    before = native.cache_info()
    stale = native.grad_buffer((N, T, V), dtype)
    stale.fill_(float("nan"))
    del stale  # back to the cache, NaN-filled
    assert native.cache_info()["idle_bytes"] == before["idle_bytes"] + N * T * V * dtype.itemsize
    _, grad = _grad_of(logits, labels, upstream)
    assert native.cache_info()["hits"] == before["hits"] + 1
    assert torch.isfinite(grad).all() and torch.equal(grad[1], torch.zeros_like(grad[1]))
    x = logits.double().requires_grad_()
    (want,) = torch.autograd.grad((ref_logps(x, labels) * upstream.double()).sum(), x)
    err = (grad.double() - want).norm() / want.norm()
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2)
    _, again = _grad_of(logits, labels, upstream)  # served from the cache again: same bits
    assert torch.equal(grad, again)


def test_cache_limit_and_empty_cache():
    from safedpo_kernels import native

    native.empty_cache()
    assert native.cache_info()["idle_bytes"] == 0
    buf = native.grad_buffer((64, 1000), torch.float32)
    other = native.grad_buffer((64, 1000), torch.float32)
    assert buf.data_ptr() != other.data_ptr()
    ptr = buf.data_ptr()
    del buf
    assert native.cache_info()["idle_buffers"] == 1
    same = native.grad_buffer((60, 1000), torch.float32)  # smaller, within 2x: reuses the block
    assert same.data_ptr() == ptr
    del same, other
    assert native.cache_info()["idle_buffers"] == 2
    native.empty_cache()
    assert native.cache_info()["idle_bytes"] == 0


def test_cache_off_by_environment():
    env = dict(os.environ, SAFEDPO_CPU_GRAD_CACHE_MB="0")
    code = (
        "import torch\nfrom safedpo_kernels import native, sequence_logps\n"
        "x = torch.randn(2, 5, 300, requires_grad=True)\n"
        "sequence_logps(x, torch.randint(0, 300, (2, 5)), backend='native').sum().backward()\n"
        "x.grad = None\nimport json\nprint(json.dumps(native.cache_info()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["limit_bytes"] == 0 and info["idle_bytes"] == 0 and info["misses"] == 1


SMALL_CALL = ("import torch\nfrom safedpo_kernels import sequence_logps\n"
              "sequence_logps(torch.randn(1, 3, 7), torch.zeros(1, 3, dtype=torch.long))\n")


@pytest.mark.parametrize("value", ["lots", "inf", "nan", "-5"])
def test_bad_cache_setting_is_named(value):
    env = dict(os.environ, SAFEDPO_CPU_GRAD_CACHE_MB=value)
    code = SMALL_CALL
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "ValueError: SAFEDPO_CPU_GRAD_CACHE_MB" in res.stderr, res.stderr


def test_bad_native_switch_is_named():
    env = dict(os.environ, SAFEDPO_NATIVE="nope")
    code = SMALL_CALL
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "ValueError: SAFEDPO_NATIVE" in res.stderr, res.stderr


FALLBACK = (
    "import warnings, torch\n"
    "from safedpo_kernels import native, sequence_logps, available_backends\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "    warnings.simplefilter('always')\n"
    "    backends = available_backends('cpu')\n"
    "    out = sequence_logps(torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.long))\n"
    "    available_backends('cpu')\n"
    "msgs = [str(x.message) for x in w if 'native CPU kernels are not available' in str(x.message)]\n"
    "print(backends[0], round(float(out), 4), len(msgs))\n"
    "print(msgs[0] if msgs else '')\n"
)


def _fallback(env_extra, setup=None):
    env = dict(os.environ, **env_extra)
    code = (setup or "") + FALLBACK
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary, message = res.stdout.strip().splitlines()[-2:]
    # "auto" ran on the torch backend; one warning however often the backend is asked for.
    assert summary == "torch -3.2189 1", res.stdout
    return message


def test_missing_source_falls_back(tmp_path):
    """An installation without csrc/ (as the wheel had once): one warning, then backend 'torch'."""
    setup = ("from safedpo_kernels import _native_build\nfrom pathlib import Path\n"
             "_native_build._SOURCE_CANDIDATES = (Path('/nonexistent/csrc/logprob.cpp'),)\n")
    message = _fallback(dict(SAFEDPO_CACHE_DIR=str(tmp_path)), setup)
    assert "FileNotFoundError" in message and "logprob.cpp" in message


def test_two_checkouts_or_venvs_build_apart(tmp_path, monkeypatch):
    """The same source in two places (two checkouts, a checkout and a wheel), or one torch version in two
    venvs, get two cache directories: the paths are in the build command, so ninja would otherwise
    relink one shared library on every switch, under any process that has it loaded."""
    import types

    import torch

    from safedpo_kernels import _native_build

    first = _native_build.build_dir()
    assert _native_build.build_dir() == first  # stable
    copy = tmp_path / "csrc" / "logprob.cpp"
    copy.parent.mkdir()
    copy.write_bytes(_native_build._source().read_bytes())
    monkeypatch.setattr(_native_build, "_SOURCE_CANDIDATES", (copy,))
    assert _native_build.build_dir() != first
    monkeypatch.undo()
    other_venv = types.SimpleNamespace(__version__=torch.__version__, __file__=str(tmp_path / "torch" / "__init__.py"))
    monkeypatch.setattr(_native_build, "torch", other_venv)
    assert _native_build.build_dir() != first


def _cached_build_copy(tmp_path):
    """The current build, copied (timestamps kept) under a fresh cache root: the same key finds it."""
    import shutil

    from safedpo_kernels import native

    root = tmp_path / "cache"
    target = root / native.build_dir().name
    shutil.copytree(native.build_dir(), target)
    return root, target / "safedpo_native.so"


def test_changed_cached_library_is_not_loaded(tmp_path):
    """A cached library that is not what was built (its SHA-256 differs from the record): one warning,
    'torch', and the file is never loaded."""
    root, library = _cached_build_copy(tmp_path)
    library.write_bytes(library.read_bytes() + b"\0")
    message = _fallback(dict(SAFEDPO_CACHE_DIR=str(root)))
    assert "does not match the SHA-256 recorded" in message


def test_corrupt_cached_library_falls_back(tmp_path):
    """Unloadable bytes, even with a matching record: one warning and 'torch'."""
    import hashlib

    root, library = _cached_build_copy(tmp_path)
    library.write_bytes(b"not an ELF file")  # newer than its objects: ninja keeps it
    library.with_name(library.name + ".sha256").write_text(hashlib.sha256(b"not an ELF file").hexdigest())
    message = _fallback(dict(SAFEDPO_CACHE_DIR=str(root)))
    assert "safedpo_native.so" in message or "OSError" in message


def test_cached_library_without_the_kernels_falls_back(tmp_path):
    """A library that loads but registers none of the kernels (stale or foreign): not used."""
    import hashlib

    root, library = _cached_build_copy(tmp_path)
    src = tmp_path / "empty.c"
    src.write_text("int safedpo_placeholder(void) { return 0; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(src)], check=True)
    library.with_name(library.name + ".sha256").write_text(hashlib.sha256(library.read_bytes()).hexdigest())
    message = _fallback(dict(SAFEDPO_CACHE_DIR=str(root)))
    assert "does not provide" in message and "logp_forward" in message


def test_cache_is_private():
    from safedpo_kernels import native

    assert oct(native.build_dir().stat().st_mode & 0o777) == oct(0o700)


def test_a_build_killed_midway_does_not_block_the_next(tmp_path):
    """SIGKILL during the first build leaves torch's lock file behind; the next process still builds
    (an flock dies with its holder) instead of waiting forever."""
    import signal
    import time

    env = dict(os.environ, SAFEDPO_CACHE_DIR=str(tmp_path))
    code = "from safedpo_kernels import native; import json; print(json.dumps(native.build_info()))"
    first = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("native-*/lock")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob("native-*/lock")), "the first build never started"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert list(tmp_path.glob("native-*/lock"))  # the stale lock torch's build leaves behind
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["ok"] and info["built"], res.stderr[-2000:]


def test_a_rebuilt_library_gets_a_new_record(tmp_path):
    """ninja relinks a cached library when, say, a second checkout of the same source builds into the
    same cache: the record follows what was built, and the next process still loads it."""
    root, library = _cached_build_copy(tmp_path)
    env = dict(os.environ, SAFEDPO_CACHE_DIR=str(root))
    relink = (
        "from torch.utils import cpp_extension\n"
        "real = cpp_extension.load\n"
        "def load(*args, **kwargs):\n"
        "    out = real(*args, **kwargs)\n"
        "    path = kwargs['build_directory'] + '/safedpo_native.so'\n"
        "    open(path, 'ab').write(b'\\0')  # the library on disk is no longer the verified one\n"
        "    return out\n"
        "cpp_extension.load = load\n"
        "from safedpo_kernels import native\nprint(native.load())\n"
    )
    first = subprocess.run([sys.executable, "-c", relink], env=env, capture_output=True, text=True, timeout=600)
    assert first.stdout.strip().endswith("True"), first.stderr[-2000:]
    again = subprocess.run([sys.executable, "-c", "from safedpo_kernels import native; print(native.load())"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.stdout.strip().endswith("True") and "not available" not in again.stderr, again.stderr[-2000:]
