"""Training configuration: one flat dataclass with defaults, loaded from YAML, overridden by key=value.

    cfg = load_config("run.yaml", ["beta=0.2", "mode=noswap"])

Unknown keys (in the file or on the command line) are an error that names them. The resolved config is
saved as config.yaml in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml

MODES = ("safedpo", "dpo-helpful", "dpo-harmless", "dpo-safebetter", "noswap")


def loss_flags(mode: str, delta: float) -> dict:
    """delta / swap / drop_both_unsafe of the SafeDPO loss for a mode: SafeDPO (T and delta), NoSwap
    (delta, no swap), or plain DPO for the three baselines (which differ in their data, see data.py)."""
    if mode == "safedpo":
        return dict(delta=delta, swap=True, drop_both_unsafe=True)
    if mode == "noswap":
        return dict(delta=delta, swap=False, drop_both_unsafe=True)
    return dict(delta=0.0, swap=False, drop_both_unsafe=False)


@dataclass
class TrainConfig:
    # --- data (PKU-SafeRLHF columns by default; `columns` remaps them, e.g. {prompt: question}) ---
    train_files: List[str] = field(default_factory=list)  # json/jsonl/parquet/csv files or a saved dataset dir
    eval_files: List[str] = field(default_factory=list)
    columns: dict = field(default_factory=dict)
    mode: str = "safedpo"  # safedpo | dpo-helpful | dpo-harmless | dpo-safebetter | noswap
    safety_label_noise: float = 0.0  # flip each safety flag with this probability (seeded)
    skip_bad_rows: bool = False  # skip and count malformed rows instead of stopping
    max_prompt_length: int = 128  # prompts are cut from the left (their end is kept)
    max_length: int = 256  # prompt + response; responses are cut from the right
    # --- model ---
    model: str = ""  # a local Hugging Face model directory
    tokenizer: str = ""  # defaults to `model`
    tiny_model: dict = field(default_factory=dict)  # LlamaConfig kwargs for a model built from a config
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when flash_attn imports, else sdpa
    gradient_checkpointing: bool = False
    # --- loss ---
    beta: float = 0.1
    delta: float = 10.0
    label_smoothing: float = 0.0
    average_logps: bool = False
    loss_input: str = "logits"  # logits (fused kernel, in-place backward) | linear (no logits) | eager (baseline)
    backend: str = "auto"
    reference: str = "precompute"  # precompute (cached on disk) | live (a frozen copy in memory)
    reference_model: str = ""  # defaults to the initial policy
    # --- optimization ---
    batch_size: int = 4  # pairs per optimizer step and rank, per micro-batch
    grad_accum: int = 1
    lr: float = 5e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 100
    stop_at_step: int = 0  # stop after this step (as an interrupted job would), keeping max_steps' schedule
    clip_grad_norm: float = 1.0
    seed: int = 0
    # --- run ---
    output_dir: str = "runs/safedpo"
    cache_dir: str = ""  # reference log-prob cache; default <output_dir>/../.cache
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    resume: str = "auto"  # auto (latest checkpoint in output_dir, if any) | none | a checkpoint directory
    tensorboard: bool = False
    fsdp: bool = False
    device: str = "auto"
    progress: bool = True

    def validate(self) -> "TrainConfig":
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.loss_input not in ("logits", "linear", "eager"):
            raise ValueError(f"loss_input must be 'logits', 'linear' or 'eager', got {self.loss_input!r}")
        if self.reference not in ("precompute", "live"):
            raise ValueError(f"reference must be 'precompute' or 'live', got {self.reference!r}")
        if not 0.0 <= self.safety_label_noise <= 1.0:
            raise ValueError(f"safety_label_noise must be in [0, 1], got {self.safety_label_noise}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        if not self.model and not self.tiny_model:
            raise ValueError("set model (a local model directory) or tiny_model (a LlamaConfig dict)")
        if not self.train_files:
            raise ValueError("train_files is empty")
        return self

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))


def _coerce(name: str, text: str, current: Any) -> Any:
    """Parse a command-line value as YAML, then check it against the field's current type."""
    value = yaml.safe_load(text) if text != "" else ""
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"{name} expects true/false, got {text!r}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, list) and isinstance(value, str):
        value = [value]
    if current is not None and not isinstance(value, type(current)):
        raise ValueError(f"{name} expects {type(current).__name__}, got {text!r}")
    return value


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None, **kwargs) -> TrainConfig:
    """Defaults <- YAML file <- ``kwargs`` <- ``key=value`` overrides; unknown keys raise ValueError."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file is a mapping of keys to values")
        values.update(loaded)
    values.update(kwargs)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}" + (f" (in {path})" if path else ""))
    cfg = TrainConfig(**values)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        if key not in names:
            raise ValueError(f"unknown config key: {key}")
        setattr(cfg, key, _coerce(key, text, getattr(cfg, key)))
    return cfg


def config_json(cfg: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)
