"""Backend "native" specifics (issue #4): thread-count independence and the build cache.

The numerical tests of every backend (test_sequence_logps, test_safedpo_loss, test_linear) run on
"native" too through the shared ``case`` fixture.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from safedpo_kernels import sequence_logps
from safedpo_kernels.api import native_available, resolve_backend
from conftest import make_labels, make_logits

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
        "import torch\nfrom safedpo_kernels.api import resolve_backend\n"
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
        "from safedpo_kernels.api import resolve_backend\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = resolve_backend('auto', torch.device('cpu'))\n"
        "    b = resolve_backend('auto', torch.device('cpu'))\n"
        "print(a, b, sum('native CPU kernels could not be built' in str(x.message) for x in w))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.stdout.strip().splitlines()[-1] == "torch torch 1", res.stdout + res.stderr
