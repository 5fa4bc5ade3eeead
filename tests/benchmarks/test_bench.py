"""The benchmark tooling runs end to end (not its numbers: those live in bench/results)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHON=sys.executable, **extra)
    return env


def test_gpu_check_dry_run(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "tmp"  # $OUT, and the temporary directory of all it runs
    out.mkdir()
    scratch.mkdir()
    res = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"],
        env=_env(OUT=str(out), TMPDIR=str(scratch)), capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    tables = list(out.glob("gpu-*.md"))
    assert len(tables) == 1
    text = tables[0].read_text()
    assert "| sequence_logps |" in text and "| triton |" in text
    with open(next(out.glob("gpu-*.csv"))) as f:
        rows = list(csv.DictReader(f))
    ok = {(r["op"], r["variant"]) for r in rows if r["status"] == "ok"}
    assert ("sequence_logps", "triton") in ok and ("linear_safedpo_loss", "ours-triton") in ok
    assert all(r["matches"] == "yes" for r in rows if r["status"] == "ok")
    # Liger's DPO case (bias, a reference model) and the cuBLAS-GEMM setting ran.
    assert any(r["ref_model"] == "True" and r["bias"] == "True" and r["status"] == "ok" for r in rows)
    assert any(r["settings"] == "LINEAR_GEMM=cublas" and r["status"] == "ok" for r in rows)
    # Liger-Kernel, Cut Cross-Entropy and TRL's fused head (test extras) run on the CPU here, with and
    # without a reference model, so that a wrong call into them is found before a GPU run's minutes are
    # spent on it; ours with token statistics too.
    assert ("linear_safedpo_loss", "ours-triton-stats") in ok
    for variant, count in (("liger", 3), ("cce", 4), ("trl-head", 3)):  # Liger and TRL's head: padded only
        others = [r for r in rows if r["variant"] == variant and r["status"] != "padded batches only"]
        assert len(others) == count and all(r["status"] == "ok" for r in others), others
        assert {r["ref_model"] for r in others} == {"True", "False"}
    # The targets follow the table; the accuracy stage checked every backend; everything is in the log.
    assert "## Targets" in text and "- logits path, in place:" in text
    # The issue model's prediction (read from H100's SASS in the dry run) follows the targets.
    model = next(line for line in text.splitlines() if line.startswith("- issue model"))
    assert "H100 SASS" in model and "forward: issue" in model and "at least" in model, model
    accuracy = next(out.glob("gpu-accuracy-*.txt")).read_text()
    assert accuracy.count("-> ok") == 12 and "FAILED" not in accuracy
    # The trainers stage: ours, SafeDPOTrainer and TRL's DPOTrainer each ran and agree on the first loss.
    trainers = next(out.glob("trainers-*.md")).read_text()
    for variant in ("ours-linear", "safedpo-trainer-linear", "trl-dpo"):
        row = next(line for line in trainers.splitlines() if line.startswith(f"| {variant} |"))
        assert "failed" not in row, row
    assert "no verdict from 1 round" in trainers
    spread = float(trainers.split("agree to ")[1].split(" ")[0])
    assert spread < 1e-4, spread
    # What comes back from the device is at most 8 files.
    assert len([f for f in out.rglob("*") if f.is_file()]) <= 8, sorted(p.name for p in out.rglob("*"))
    assert res.stdout.rstrip().splitlines()[-1] == "== gpu_check status: 0 =="
    log = (out / "gpu_check.log").read_text()
    assert "== benchmark ==" in log and "== trainers ==" in log
    # The benchmarks' scratch directories (models, data, trainer outputs) are gone.
    assert not list(scratch.glob("bench-*")), sorted(p.name for p in scratch.iterdir())


def test_gpu_check_stage_limits_fit_the_device_time_and_match_its_table():
    """The stages' time limits (LIMIT_* in the script) sum to at most 9 minutes (the device's 15 include
    the machine's start and a rerun), and the table in the script's header says the same."""
    import re

    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    limits = {k.lower(): int(v) for k, v in re.findall(r"^LIMIT_([A-Z]+)=(\d+)$", script, re.M)}
    assert set(limits) == {"tests", "accuracy", "bench", "trainers"}
    assert sum(limits.values()) <= 9 * 60
    table = {k: int(v) for k, v in re.findall(r"^#   (\w+) +(\d+) s ", script, re.M)}
    assert table == dict(limits, total=sum(limits.values())), table
    stages = re.search(r"^STAGES=\$\{STAGES:-([a-z ]+)\}$", script, re.M).group(1).split()
    assert stages == list(limits)


def test_suite_writes_csv_markdown_plot(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "bench.suite", "--T", "13", "--V", "96", "--ops", "sequence_logps,linear_safedpo_loss",
         "--variants", "eager,native-inplace,ours-torch", "--repeats", "1", "--H", "16", "--out", str(tmp_path)],
        env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stem = next(tmp_path.glob("*.csv")).with_suffix("")
    assert Path(f"{stem}.md").exists() and Path(f"{stem}.png").stat().st_size > 1000
    with open(f"{stem}.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["op"] for r in rows} == {"sequence_logps", "linear_safedpo_loss"}
    assert all(r["status"] == "ok" and r["matches_eager"] == "yes" for r in rows)


@pytest.mark.parametrize("op, variant", [("sequence_logps", "torch-compile"), ("safedpo_loss", "native-inplac"),
                                         ("linear_safedpo_loss", "ours-torch-inplace")])
def test_misspelled_variant_is_refused(op, variant):
    from bench import cases

    with pytest.raises(ValueError, match="unknown variant"):
        cases.build(op, variant, cases.Config(N=2, T=4, V=8))


def test_variant_table_interleaves_rounds_and_calls_ties(tmp_path):
    """Two rounds of two variants, each case in a fresh process: every round's time is kept, the median
    is reported, the values agree; and a ratio under 1.05x is a tie, not "faster"."""
    from bench.variant_table import verdict

    res = subprocess.run(
        [sys.executable, "-m", "bench.linear_cpu", "--N", "2", "--T", "9", "--V", "97", "--H", "16", "--repeats", "1",
         "--rounds", "2", "--variants", "eager,ours-torch", "--device", "cpu"],
        env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("round ")] == [
        "round 1/2 eager", "round 1/2 ours-torch", "round 2/2 eager", "round 2/2 ours-torch"]
    row = next(line.split() for line in out.splitlines() if line.startswith("ours-torch "))
    assert float(row[6]) < 1e-5  # the loss's deviation from eager's
    assert len(row) == 9  # variant, 6 figures, then both rounds' times
    assert verdict(1.0, 1.04).startswith("tie") and verdict(1.0, 1.06) == "1.06x faster"
    assert verdict(1.06, 1.0) == "1.06x slower"
