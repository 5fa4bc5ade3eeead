"""A run's output directory: what a run leaves there, starting afresh or refusing another run's files,
the configuration keys a resume compares, and the metrics log (strict JSON lines, TensorBoard when asked)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpoint import remove_leftovers
from .guards import finite_or_none
from .outputs import prepare_dir, writing


class MetricsLog:
    """metrics.jsonl (and TensorBoard when asked), written by the main process only. Strict JSON: a
    non-finite number (a diverged step's loss) is written as null."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        self.file = None
        if enabled:
            with writing("metrics", self.path):
                self.file = open(self.path, "a")
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict, step=None) -> None:
        if self.file is None:
            return
        record = finite_or_none(record)
        with writing("metrics", self.path):
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
            self.file.flush()
        if self.writer and step is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()
        self.file = self.writer = None


# What a run leaves in its output directory (besides config.yaml, which every start rewrites).
RUN_FILES = ("checkpoints", "metrics.jsonl", "final", "tensorboard")


# The configuration a checkpoint's training depends on: resuming under other values of these would not
# continue that run (a changed max_steps changes the learning-rate schedule, a changed seed or batch size
# the data order, ...). loss_input, backend, device, logging and saving settings may change.
RESUME_KEYS = ("mode", "beta", "delta", "label_smoothing", "loss_type", "loss_weights", "reduction", "average_logps",
               "train_files", "train_dataset", "dataset_config", "data_dir", "train_split", "columns",
               "safety_label_noise", "skip_bad_rows", "max_prompt_length", "max_length", "model", "tokenizer",
               "tiny_model", "lora", "router_aux_loss_coef", "reference", "reference_model", "batch_size",
               "grad_accum", "lr", "weight_decay", "warmup_steps", "max_steps", "clip_grad_norm", "seed", "fsdp",
               "tensor_parallel", "world_size")


def prepare_output_dir(out_dir: Path, overwrite: bool, resume: str) -> None:
    """The output directory, writable (or one line saying why not), without what a crash left mid-save;
    with ``overwrite`` emptied of the previous run's files (or one line naming what could not go)."""
    prepare_dir(out_dir)
    remove_leftovers(out_dir)
    if not overwrite:
        return
    if resume not in ("auto", "none", "") and Path(resume).resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"overwrite_output_dir deletes the checkpoint resume={resume!r} names; set one of them only")
    for name in RUN_FILES:
        path = out_dir / name
        with writing("(removing the previous run's)", path, "nothing new was written"):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def refuse_another_run(out_dir: Path, resume: str) -> None:
    """Starting afresh over another run's files would mix two runs (and a later resume: auto would pick up
    the other one): refuse, saying what to do instead (with resume: auto, that there is no checkpoint)."""
    previous = [name for name in RUN_FILES[:3] if (out_dir / name).exists()]
    if not previous:
        return
    held = f"output_dir {str(out_dir)!r} holds another run ({', '.join(previous)})"
    if resume == "auto":
        raise ValueError(f"{held} but no checkpoint to continue (it stopped before its first save: save_every sets how "
                         "often it saves); start afresh with overwrite_output_dir: true (deleting its files), or choose "
                         "another output_dir")
    raise ValueError(f"{held}: set resume: auto to continue it, another output_dir, or overwrite_output_dir: true to "
                     "delete it and start afresh")


def config_changes(saved: dict, now: dict) -> list:
    """'key: saved -> now' for each training-relevant key whose value differs."""
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in RESUME_KEYS if k in saved and k in now and saved[k] != now[k]]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records a run resumed at ``step`` continues: its steps up to ``step`` and its start and
    resume events; drop later steps and the evaluation the finished run ended with (which the resumed run
    writes again), and lines a crash cut short."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        event = record.get("event")
        if event in ("start", "resume") or (event is None and record.get("step", 0) <= step) or \
                (event == "eval" and record.get("step", 0) < step):
            keep.append(line)
    with writing("metrics", path):
        path.write_text("".join(line + "\n" for line in keep))
