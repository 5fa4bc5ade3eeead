"""The package as users install it: a wheel built from the project, installed into a fresh virtual
environment outside the checkout, builds and runs the C++ CPU kernels from the sources it ships."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

CODE = """
import json, torch, safedpo_kernels
from safedpo_kernels import native, sequence_logps
g = torch.Generator().manual_seed(0)
x = torch.randn(3, 7, 301, generator=g)
labels = torch.randint(0, 301, (3, 7), generator=g)
a = sequence_logps(x, labels, backend="native")
b = sequence_logps(x, labels, backend="torch")
print(json.dumps(dict(module=safedpo_kernels.__file__, info=native.build_info(), native=a.tolist(), torch=b.tolist())))
"""


def test_wheel_in_a_fresh_venv_builds_and_runs_native(tmp_path):
    # Built with this environment's setuptools (no build isolation: no download); pyproject's
    # [build-system] asks for setuptools >= 68, which a bare Python 3.11 venv (65.5) lacks.
    pytest.importorskip("setuptools", minversion="68")
    wheels = tmp_path / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(wheels)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = wheels.glob("safedpo_kernels-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    # torch, numpy and ninja come from this environment's site-packages (added as a plain path: its .pth
    # files, among them the editable install of the checkout, are not processed).
    (site / "_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SAFEDPO_NATIVE")}
    env["SAFEDPO_CACHE_DIR"] = str(tmp_path / "cache")  # a cold cache: the build starts from the wheel's sources
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # ninja
    res = subprocess.run([str(python), "-c", CODE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(out["module"]).is_relative_to(site), out["module"]  # the installed copy, not the checkout
    assert out["info"]["ok"] and out["info"]["built"], out["info"]
    assert Path(out["info"]["library"]).is_relative_to(tmp_path / "cache")
    assert torch.allclose(torch.tensor(out["native"]), torch.tensor(out["torch"]), rtol=1e-5, atol=1e-5)
    assert "warn" not in res.stderr.lower(), res.stderr


def test_flash_attention_is_a_gpu_extra_only():
    """pip install 'safedpo-kernels[gpu]' brings flash-attn; the CPU set-up (requirements-cpu.txt, the
    Makefile's extras) never does: it builds against CUDA and would pull a CUDA build of torch."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("flash-attn") for d in extras["gpu"])
    makefile = (ROOT / "Makefile").read_text()
    used = {e for e in extras if f".[{e}]" in makefile}
    assert used and "gpu" not in used
    for name in used:
        assert not any("flash" in d for d in extras[name]), name
    assert "flash" not in (ROOT / "requirements-cpu.txt").read_text()


def test_the_lock_pins_every_requirement_inside_pyprojects_ranges():
    """requirements-lock.txt (what make test installs) pins every package pyproject names for the CPU
    set-up, each at a version inside pyproject's range, and torch at requirements-cpu.txt's CPU pin."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from helpers import locked_versions

    pins = locked_versions()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        if extra != "gpu":  # flash-attn: GPU machines only
            wanted += requirements
    checked = 0
    for line in wanted:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} ({line}) is not pinned in requirements-lock.txt: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"the lock's {name}=={pins[name]} is outside {line!r}"
        checked += 1
    assert checked >= 20, checked
    cpu = [Requirement(r) for r in (ROOT / "requirements-cpu.txt").read_text().splitlines() if r and not r.startswith("#")]
    assert [(canonicalize_name(r.name), str(r.specifier)) for r in cpu] == [("torch", f"=={pins['torch']}")]
