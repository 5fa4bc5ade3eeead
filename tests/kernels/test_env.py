"""The SAFEDPO_* environment variables: one table in _env.py, the same in docs/backends.md, and every
variable the code reads among them; malformed values are errors naming the variable."""

import re
from pathlib import Path

import pytest

from safedpo_kernels import _env

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"SAFEDPO_[A-Z0-9_]*[A-Z0-9]")


def test_every_variable_the_code_reads_is_in_the_table_and_the_docs():
    code = set()
    for folder in ("safedpo_kernels", "safedpo", "csrc", "bench"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".cpp", ".sh"):
                code |= set(NAME.findall(path.read_text()))
    docs = set(re.findall(r"^\| `(SAFEDPO_[A-Z0-9_]+)` \|", (ROOT / "docs" / "backends.md").read_text(), re.M))
    assert code == set(_env.VARIABLES) == docs, (code ^ set(_env.VARIABLES), docs ^ set(_env.VARIABLES))


@pytest.mark.parametrize("value", ["lots", "nan", "inf", "-1"])
def test_a_malformed_number_names_its_variable(monkeypatch, value):
    monkeypatch.setenv("SAFEDPO_CPU_GRAD_CACHE_MB", value)
    with pytest.raises(ValueError, match=f"SAFEDPO_CPU_GRAD_CACHE_MB must be a finite number >= 0, got '{value}'"):
        _env.cpu_grad_cache_bytes()


def test_the_readers_defaults_and_values(monkeypatch, tmp_path):
    for name in ("SAFEDPO_CACHE_DIR", "SAFEDPO_CPU_GRAD_CACHE_MB", "SAFEDPO_LINEAR_SPLITS"):
        monkeypatch.delenv(name, raising=False)
    assert _env.cache_dir() == Path.home() / ".cache" / "safedpo_kernels"
    assert _env.linear_splits() is None and _env.cpu_grad_cache_bytes() > 0
    monkeypatch.setenv("SAFEDPO_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SAFEDPO_CPU_GRAD_CACHE_MB", "1.5")
    monkeypatch.setenv("SAFEDPO_LINEAR_SPLITS", "3")
    assert (_env.cache_dir(), _env.cpu_grad_cache_bytes(), _env.linear_splits()) == (tmp_path, 3 << 19, 3)
    monkeypatch.setenv("SAFEDPO_LINEAR_SPLITS", "0")
    with pytest.raises(ValueError, match="SAFEDPO_LINEAR_SPLITS"):
        _env.linear_splits()
    assert _env.float32_rows(4 * 1000 * 7, 1000) == 7 and _env.float32_rows(3, 1000) == 1
