"""Checkpoints: model, optimizer, scheduler, RNG states and data position, written atomically.

A checkpoint is a directory ``checkpoints/step-<k>/`` holding ``state.pt`` (tensors and plain
containers only: it is loaded with ``weights_only=True``, so a checkpoint file cannot run code) and
``meta.json`` (step, data position, the Python and NumPy RNG states). It is written into a temporary
directory, flushed to disk (fsync), then renamed: a crash leaves either the previous checkpoints or the
new one, never half of one; temporary directories a crash left behind are removed at the next start. A
full disk is reported as such, and the last complete checkpoint stays usable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from .outputs import writing


class TrainState(NamedTuple):
    """What a checkpoint restores: the model (the policy; with FSDP or tensor parallel its sharded wrapper),
    the optimizer and the learning-rate schedule."""

    model: Any
    optimizer: Any
    scheduler: Any


class Position(NamedTuple):
    """Where a checkpoint stands (its meta.json besides the RNGs): the optimizer steps taken, the data
    stream's position, the run's configuration (compared on resume) and the run's own counters that a
    resume continues (``saved_counters``)."""

    step: int
    data: int
    config: Optional[dict] = None
    counters: Optional[dict] = None

    def meta(self, **more) -> dict:
        return dict(step=self.step, position=self.data, config=self.config, counters=self.counters or {}, **more)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> tuple:
    """(tensors, json-able): the torch / CUDA generator states, and Python's and NumPy's."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = dict(torch=torch.get_rng_state())
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    plain = dict(python=[version, list(internal), gauss], numpy=[kind, keys.tolist(), int(pos), int(has_gauss), float(cached)])
    return tensors, plain


def set_rng_state(tensors: dict, plain: dict) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))


def checkpoints(output_dir: Path) -> list:
    """The complete checkpoints under output_dir, oldest first."""
    found = [p for p in (Path(output_dir) / "checkpoints").glob("step-*") if p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def remove_leftovers(output_dir: Path) -> list:
    """Delete the temporary checkpoint directories of a run that crashed while saving; their names."""
    leftovers = list((Path(output_dir) / "checkpoints").glob(".tmp-*"))
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in leftovers]


def resume_point(resume: str, output_dir: Path) -> Optional[Path]:
    """The checkpoint a run continues from: the latest (``auto``), none, or the given directory."""
    if resume == "auto":
        return latest_checkpoint(output_dir)
    if resume in ("none", ""):
        return None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"resume: {resume!r} is not a checkpoint directory (no meta.json in it)")
    return path


def saved_config(path: Path) -> Optional[dict]:
    """The configuration a checkpoint was written under (kept in its meta.json), or None."""
    return json.loads((Path(path) / "meta.json").read_text()).get("config")


def _trainable(model) -> Optional[set]:
    """Names of the trainable parameters when only some train (LoRA adapters), else None (all of them)."""
    params = dict(model.named_parameters())
    names = {n for n, p in params.items() if p.requires_grad}
    return names if len(names) < len(params) else None


def model_state(model) -> dict:
    """What a checkpoint keeps of the model: its whole state, or only the trainable parameters when the
    rest is frozen (LoRA: the adapters, not a copy of the base model per checkpoint)."""
    names = _trainable(model)
    state = model.state_dict()
    return state if names is None else {k: v for k, v in state.items() if k in names}


def restore_model(model, state: dict) -> None:
    """Load ``model_state``'s output; with a partial state every trainable parameter must be in it."""
    names = _trainable(model)
    if names is None:
        model.load_state_dict(state)
        return
    missing = sorted(names - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model's trainable parameters: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)


def _fsync_tree(path: Path) -> None:
    for item in [*path.iterdir(), path]:
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomically(root: Path, name: str, write) -> Path:
    """``write(tmp_dir)`` fills a temporary directory, which is flushed and renamed to ``root/name``.
    A failed write (a full disk, also as torch.save's RuntimeError) removes the temporary directory and
    raises an OutputError that says what failed, that nothing of it was kept and which complete
    checkpoints are intact."""
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    intact = ", ".join(p.name for p in checkpoints(root.parent)) or "none yet"
    with writing("checkpoint", final, f"nothing of it was kept, and the complete checkpoints are intact ({intact})"):
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            write(tmp)
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_tree(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_checkpoint(output_dir: Path, state: TrainState, at: Position, keep: int = 0) -> Path:
    """The training state at ``at`` (``checkpoints/step-<at.step>``); with ``keep`` > 0 only the newest
    ``keep`` checkpoints remain."""
    tensors, plain = rng_state()

    def write(tmp: Path) -> None:
        torch.save(dict(model=model_state(state.model), optimizer=state.optimizer.state_dict(),
                        scheduler=state.scheduler.state_dict(), rng=tensors), tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(at.meta(rng=plain)))

    final = write_atomically(Path(output_dir) / "checkpoints", f"step-{at.step}", write)
    if keep > 0:
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def saved_counters(path: Path) -> dict:
    """The counters a checkpoint's run kept (``save_checkpoint``'s ``counters``; {} when none)."""
    return json.loads((Path(path) / "meta.json").read_text()).get("counters") or {}


def load_checkpoint(path: Path, state: TrainState) -> tuple:
    """Restore a checkpoint into the model, optimizer, scheduler and the RNGs; returns (step, position).
    Loaded with weights_only=True: tensors and plain containers, no code."""
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("sharded"):
        cfg = meta.get("config") or {}
        layout = f"tensor_parallel: {cfg['tensor_parallel']}" if cfg.get("tensor_parallel", 1) > 1 else "fsdp: true"
        raise ValueError(f"{path} holds shards; resume it with {layout} on {meta['world']} ranks")
    saved = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    restore_model(state.model, saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"], meta["rng"])
    return meta["step"], meta["position"]


def save_sharded_checkpoint(output_dir: Path, state: TrainState, at: Position, procs, keep: int = 0) -> Path:
    """FSDP: every rank writes its own shards of the model and optimizer (torch.distributed.checkpoint)
    and its RNG states; rank 0 the scheduler and meta.json, then renames the directory when all are
    done. A collective: every rank of ``procs`` (rank, world, barrier()) calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, barrier = procs.rank, procs.barrier
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{at.step}"
    tmp = root / f".tmp-step-{at.step}-sharded"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(state.model, state.optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "shards"))
    tensors, plain = rng_state()
    torch.save(tensors, tmp / f"rng-{rank}.pt")
    (tmp / f"rng-{rank}.json").write_text(json.dumps(plain))
    if rank == 0:
        torch.save(state.scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "meta.json").write_text(json.dumps(at.meta(world=procs.world, sharded=True)))
    barrier()
    if rank == 0:
        for sub in [tmp / "shards", tmp]:
            _fsync_tree(sub)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_tree(root)
        if keep > 0:
            for old in checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_sharded_checkpoint(path: Path, state: TrainState, rank: int, world: int) -> tuple:
    """The counterpart of ``save_sharded_checkpoint`` on the same number of ranks; (step, position)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = json.loads((path / "meta.json").read_text())
    if not meta.get("sharded"):
        raise ValueError(f"{path} is an unsharded checkpoint; resume it without fsdp and tensor_parallel (or start afresh)")
    if meta["world"] != world:
        raise ValueError(f"{path} was written by {meta['world']} ranks; resume it on {meta['world']}, not {world}")
    model_sd, optim_sd = get_state_dict(state.model, state.optimizer)
    saved = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(saved, checkpoint_id=str(path / "shards"))
    set_state_dict(state.model, state.optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"])
    state.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / f"rng-{rank}.pt", weights_only=True), json.loads((path / f"rng-{rank}.json").read_text()))
    return meta["step"], meta["position"]
