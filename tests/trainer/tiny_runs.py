"""What the trainer's run tests share: a toy task on disk, a config for a tiny Llama, the logged losses, and
torchrun on gloo."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from safedpo.config import load_config
from safedpo.distributed import SHARDED_TORCH
from safedpo.toy import make_task, vocabulary
from safedpo.toy.tokenizer import build_tokenizer
from safedpo_kernels._env import major_minor

ROOT = Path(__file__).resolve().parents[2]
# FSDP2 over several data-parallel ranks: refused on a torch older than the trainer's floor for it.
SHARDED_OK = major_minor() >= SHARDED_TORCH
needs_sharded_torch = pytest.mark.skipif(not SHARDED_OK, reason="FSDP2 training needs torch >= 2.11")
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def task_files(root: Path) -> dict:
    """train.jsonl (48 pairs), test.jsonl (16) and the toy's tokenizer under ``root``."""
    data = make_task(seed=3, pairs_per_prompt=1)
    paths = dict(train=write_jsonl(root / "train.jsonl", data["train"][:48]),
                 test=write_jsonl(root / "test.jsonl", data["test"][:16]))
    build_tokenizer(vocabulary(), root / "tok")
    paths["tokenizer"] = str(root / "tok")
    return paths


def config(task, out, **kw):
    base = dict(train_files=[task["train"]], eval_files=[task["test"]], tokenizer=task["tokenizer"], tiny_model=TINY,
                output_dir=str(out), cache_dir=str(out.parent / "cache"), batch_size=4, max_steps=3, lr=1e-3,
                max_prompt_length=16, max_length=40, progress=False, seed=5, delta=2.0)
    base.update(kw)
    return load_config(None, **base)


def losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(Path(out_dir) / "metrics.jsonl")) if "loss" in r and "event" not in r]


def torchrun(cfg, nproc: int = 2, timeout: int = 600, fault: Optional[dict] = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """``safedpo train`` on ``cfg`` under torchrun with ``nproc`` local processes (with a ``fault``, see
    ``safedpo_train``); unless ``check`` is off, fails the test with the end of their stderr when the run
    fails."""
    return safedpo_train(cfg, fault, timeout, check, launcher=[*TORCHRUN[:-1], f"--nproc_per_node={nproc}"])


# --standalone: a local rendezvous on a free port, so parallel runs do not collide
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


FAULT_HOOK = """
import os
if os.environ.get("SAFEDPO_TEST_FAULT"):
    import faults
    faults.install(os.environ["SAFEDPO_TEST_FAULT"], int(os.environ["SAFEDPO_TEST_FAULT_STEP"]),
                   os.environ.get("SAFEDPO_TEST_FAULT_RANK"))
"""


def safedpo_train(cfg, fault: Optional[dict] = None, timeout: int = 600, check: bool = True,
                  launcher=()) -> subprocess.CompletedProcess:
    """``python [launcher] -m safedpo train`` on ``cfg``. ``fault``: {mode, step, rank (optional)} of
    faults.install, installed in every process by a sitecustomize module before the run starts."""
    cfg_file = Path(cfg.run.output_dir).with_suffix(".yaml")
    cfg.save(cfg_file)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if fault is not None:
        hook = cfg_file.parent / f"{cfg_file.stem}-hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(FAULT_HOOK)
        env["PYTHONPATH"] = os.pathsep.join([str(hook), str(Path(__file__).parent), str(ROOT)])
        env.update(SAFEDPO_TEST_FAULT=fault["mode"], SAFEDPO_TEST_FAULT_STEP=str(fault["step"]))
        if fault.get("rank") is not None:
            env["SAFEDPO_TEST_FAULT_RANK"] = str(fault["rank"])
    return safedpo_command(["train", "--config", str(cfg_file)], timeout, check, launcher, env)


def safedpo_command(args, timeout: int = 600, check: bool = True, launcher=(), env=None) -> subprocess.CompletedProcess:
    """``python [launcher] -m safedpo *args`` from the repository root; unless ``check`` is off, fails the
    test with the end of its stderr when it fails or leaves its process group to the interpreter's exit."""
    env = env or dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, *launcher, "-m", "safedpo", *args], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT, env=env)
    if check:
        assert res.returncode == 0, res.stderr[-4000:]
        # a group left to the interpreter's exit can abort a rank there (Dist.close)
        assert "the process group is still held" not in res.stderr, res.stderr[-4000:]
    return res
