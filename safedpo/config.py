"""Training configuration in sections (data, model, loss, optim, run, parallel, eval), read and written
as one flat mapping of keys: a YAML file, keyword arguments and ``key=value`` overrides.

    cfg = load_config("run.yaml", ["beta=0.2", "mode=noswap"])
    cfg.loss.beta, cfg.data.mode, cfg.model.path      # 0.2, "noswap", the `model` key

Every key belongs to exactly one section, and each builder takes its section (``data_sources(cfg.data,
...)``, ``build_model(cfg.model, ...)``). Every value, from the file, from keyword arguments or from the
command line, is converted to its key's type and range-checked when the config is loaded, and an error
names the key: numbers in any YAML spelling are accepted ("5e-6", which PyYAML reads as a string, is
5e-06), a single file name where a list is expected becomes a one-element list, and an unknown key, a 0
batch size or a quoted 'no' for a true/false setting are errors. The resolved config is saved, flat, as
config.yaml in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from safedpo_kernels import BACKENDS
from safedpo_kernels.integrations.hf import LOSS_INPUTS
from safedpo_kernels.options import REDUCTIONS, LossOptions

from .guards import NONFINITE_MODES

MODES = ("safedpo", "dpo-helpful", "dpo-harmless", "dpo-safebetter", "noswap")


def loss_flags(mode: str, delta: float) -> dict:
    """delta / swap / drop_both_unsafe of the SafeDPO loss for a mode: SafeDPO (T and delta), NoSwap
    (delta, no swap), or plain DPO for the three baselines (which differ in their data, see data.py)."""
    if mode == "safedpo":
        return dict(delta=delta, swap=True, drop_both_unsafe=True)
    if mode == "noswap":
        return dict(delta=delta, swap=False, drop_both_unsafe=True)
    return dict(delta=0.0, swap=False, drop_both_unsafe=False)


def key(default, help: str, name: str = ""):
    """A config key: its default (a list or dict type for an empty one; a list is copied for each
    config), one line of meaning, which ``safedpo train --help`` prints, and its flat name where that
    differs from the field's."""
    meta = dict(help=help, name=name) if name else dict(help=help)
    if default in (list, dict):
        return field(default_factory=default, metadata=meta)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _at_least(section, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value < minimum:
            raise ValueError(f"{name} must be {'at least 1' if minimum == 1 else '>= 0'}, got {value}")


@dataclass
class DataConfig:
    """What is trained on (PKU-SafeRLHF columns by default; ``columns`` remaps them, e.g. {prompt: question})."""

    train_files: List[str] = key(list, "json/jsonl/parquet/csv files or a saved dataset dir")
    eval_files: List[str] = key(list, "held-out pair files (json/jsonl/parquet/csv); empty: no evaluation")
    train_dataset: str = key("", "instead of files: a Hub id (downloads when online) or a local dataset directory")
    dataset_config: str = key("", "the data set's subset (datasets.load_dataset's name)")
    data_dir: str = key("", "datasets.load_dataset's data_dir")
    train_split: str = key("train", "train_dataset's split to train on")
    eval_split: str = key("", "e.g. test: evaluation pairs from train_dataset")
    columns: dict = key(dict, "rename columns to PKU-SafeRLHF's, e.g. {prompt: question}")
    mode: str = key("safedpo", "safedpo | dpo-helpful | dpo-harmless | dpo-safebetter | noswap")
    safety_label_noise: float = key(0.0, "flip each safety flag with this probability (seeded)")
    skip_bad_rows: bool = key(False, "skip and count malformed rows instead of stopping")
    max_prompt_length: int = key(128, "prompts are cut from the left (their end is kept)")
    max_length: int = key(256, "prompt + response; responses are cut from the right")

    def validate(self) -> None:
        _choice("mode", self.mode, MODES)
        _at_least(self, 1, "max_length", "max_prompt_length")
        if not 0.0 <= self.safety_label_noise <= 1.0:
            raise ValueError(f"safety_label_noise must be in [0, 1], got {self.safety_label_noise}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        if not self.train_files and not self.train_dataset:
            raise ValueError("set train_files (data files) or train_dataset (a Hub id or a dataset directory)")
        if self.train_files and self.train_dataset:
            raise ValueError("set train_files or train_dataset, not both")


@dataclass
class ModelConfig:
    """The policy: which model, how its attention runs, LoRA adapters."""

    path: str = key("", "a local Hugging Face model directory or a Hub id (downloads when online)", name="model")
    tokenizer: str = key("", "defaults to `model`")
    tiny_model: dict = key(dict, "LlamaConfig kwargs for a model built from a config")
    attn_implementation: str = key("auto", "auto: flash_attention_2 on CUDA when installed, else sdpa, else eager")
    padding_free: Optional[bool] = key(None, "packed batches (cu_seqlens); None: with flash_attention_2")
    gradient_checkpointing: bool = key(False, "recompute activations in backward (less memory, more time)")
    lora: dict = key(dict, "{r, alpha, dropout, target_modules}: train LoRA adapters (peft)")
    merge_lora: bool = key(False, "the final model is saved with the adapters merged into the weights")
    router_aux_loss_coef: Optional[float] = key(None, "MoE load-balancing loss; None: the model config's; 0: off")

    def validate(self) -> None:
        if not self.path and not self.tiny_model:
            raise ValueError("set model (a local model directory or Hub id) or tiny_model (a LlamaConfig dict)")
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        unknown = set(self.lora) - {"r", "alpha", "dropout", "target_modules"}
        if unknown:
            raise ValueError(f"lora: unknown key(s) {sorted(unknown)}; they are r, alpha, dropout, target_modules")
        if self.merge_lora and not self.lora:
            raise ValueError("merge_lora needs lora (there are no adapters to merge)")

    def name(self) -> str:
        """How messages name the tokenizer's source."""
        return self.tokenizer or self.path or "(built for the tiny model)"


@dataclass
class LossConfig:
    """The SafeDPO loss, where its inputs come from, and the reference log-probs."""

    beta: float = key(0.1, "the implicit reward's scale (> 0)")
    delta: float = key(10.0, "SafeDPO's safety margin (>= 0, not multiplied by beta); the dpo-* modes use 0")
    label_smoothing: float = key(0.0, "eps of conservative / robust DPO, in [0, 0.5]")
    loss_type: List[str] = key(["sigmoid"], "sigmoid (SafeDPO) | robust | hinge | ipo | sft, or a list of them mixed "
                                           "by loss_weights, e.g. [sigmoid, sft]")
    loss_weights: List[float] = key(list, "one weight >= 0 per loss_type name; empty: 1.0 each")
    reduction: str = key("mean", "the step's loss over the kept pairs of its global batch: mean | sum")
    average_logps: bool = key(False, "sequence log-probs as means over response tokens instead of sums (ipo takes true)")
    loss_input: str = key("logits", "logits (fused kernel, in-place backward) | linear (no logits) | eager (baseline)")
    backend: str = key("auto", "safedpo_kernels backend: auto | triton | native | torch")
    reference: str = key("precompute", "precompute (cached on disk) | live (computed per batch)")
    reference_model: str = key("", "defaults to the initial policy (with LoRA: the adapters disabled)")

    def validate(self) -> None:
        for name, allowed in dict(loss_input=LOSS_INPUTS, reference=("precompute", "live"), reduction=REDUCTIONS,
                                  backend=BACKENDS).items():
            _choice(name, getattr(self, name), allowed)
        _at_least(self, 0, "delta")
        self.options("safedpo")  # beta, delta, label_smoothing, loss_type and loss_weights: the loss's own checks

    def options(self, mode: str) -> LossOptions:
        """The loss this section describes under a data mode (see ``loss_flags``)."""
        names = self.loss_type[0] if len(self.loss_type) == 1 else tuple(self.loss_type)
        return LossOptions(beta=self.beta, label_smoothing=self.label_smoothing, loss_type=names,
                           reduction=self.reduction, average=self.average_logps, loss_weights=self.loss_weights or None,
                           **loss_flags(mode, self.delta))


@dataclass
class OptimConfig:
    """The optimizer, its schedule, the batch and the seed."""

    batch_size: int = key(4, "pairs per optimizer step and rank, per micro-batch")
    grad_accum: int = key(1, "micro-batches per optimizer step")
    lr: float = key(5e-6, "AdamW learning rate (cosine schedule after the warm-up)")
    weight_decay: float = key(0.0, "AdamW weight decay")
    warmup_steps: int = key(0, "linear warm-up steps of the learning rate")
    max_steps: int = key(100, "optimizer steps of the run (the schedule's length)")
    stop_at_step: int = key(0, "stop after this step (as an interrupted job would), keeping max_steps' schedule")
    clip_grad_norm: float = key(1.0, "0: no clipping")
    seed: int = key(0, "seed of initialization, data order and label noise")

    def validate(self) -> None:
        _at_least(self, 1, "batch_size", "grad_accum", "max_steps")
        _at_least(self, 0, "warmup_steps", "stop_at_step", "seed", "weight_decay", "clip_grad_norm")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class RunConfig:
    """The run's directory, logs, checkpoints, what stops it, and the device it runs on."""

    output_dir: str = key("runs/safedpo", "checkpoints/, metrics.jsonl, config.yaml and final/ go here")
    overwrite_output_dir: bool = key(False, "start afresh over another run's checkpoints and metrics (deleting them)")
    cache_dir: str = key("", "reference log-prob cache; default <output_dir>/../.cache")
    log_every: int = key(1, "write metrics every this many steps")
    eval_every: int = key(0, "0: only at the end")
    save_every: int = key(0, "0: only at the end")
    save_total_limit: int = key(0, "keep only the newest k checkpoints; 0: keep all")
    resume: str = key("auto", "auto (latest checkpoint in output_dir, if any) | none | a checkpoint directory")
    resume_check: bool = key(True, "refuse a checkpoint trained under another configuration; false: continue anyway")
    nonfinite: str = key("error", "a non-finite loss or gradient: error (stop, naming the step; no update) | skip "
                                  "(skip that update)")
    max_nonfinite_steps: int = key(3, "nonfinite: skip stops the run after this many consecutive skipped steps")
    tensorboard: bool = key(False, "also write TensorBoard events under output_dir/tensorboard")
    compile: bool = key(False, "torch.compile the policy's forward and loss (the first steps, and new batch shapes, compile)")
    compile_backend: str = key("inductor", "torch.compile's backend (inductor; aot_eager traces without generating code)")
    device: str = key("auto", "auto | cuda | cpu")
    progress: bool = key(True, "progress lines on stderr (in a log file: one line every SAFEDPO_PROGRESS_EVERY_S seconds)")

    def validate(self) -> None:
        _choice("device", self.device, ("auto", "cuda", "cpu"))
        _choice("nonfinite", self.nonfinite, NONFINITE_MODES)
        _at_least(self, 1, "log_every", "max_nonfinite_steps")
        _at_least(self, 0, "eval_every", "save_every", "save_total_limit")

    def cache(self) -> Path:
        """Where reference log-prob tables are cached."""
        return Path(self.cache_dir or Path(self.output_dir).parent / ".cache")


@dataclass
class ParallelConfig:
    """How the processes of a torchrun launch share the model (one process: neither applies)."""

    fsdp: bool = key(False, "FSDP2 (fully_shard) instead of DDP under torchrun")
    tensor_parallel: int = key(1, "ranks sharing each LM head (and the decoder's layers where the model's tp_plan allows); "
                                  "the other factor of the world size splits the data (FSDP2)")

    def validate(self) -> None:
        _at_least(self, 1, "tensor_parallel")


@dataclass
class EvalConfig:
    """Sampled evaluation (``safedpo eval --generate``, and the toy's harmlessness measurement)."""

    judge: str = key("keyword", "keyword (the toy's) | classifier:<model directory or Hub id>")
    judge_threshold: float = key(0.5, "classifier: a response is unsafe when its score is above this")
    generation_prompts: str = key("", "a jsonl of {'prompt': ...}; default: the evaluation data's prompts")
    generation_samples: int = key(1, "sampled responses per prompt")
    max_new_tokens: int = key(128, "sampled evaluation: tokens per response")
    temperature: float = key(1.0, "0: greedy")

    def validate(self) -> None:
        _at_least(self, 1, "generation_samples", "max_new_tokens")
        _at_least(self, 0, "temperature")
        if self.judge != "keyword" and not (self.judge.startswith("classifier:") and len(self.judge) > len("classifier:")):
            raise ValueError(f"judge must be 'keyword' or 'classifier:<model directory or Hub id>', got {self.judge!r}")


def _section(cls):
    return field(default_factory=cls)


@dataclass
class TrainConfig:
    """A run's configuration, one section per concern; ``flat()`` is its mapping of keys."""

    data: DataConfig = _section(DataConfig)
    model: ModelConfig = _section(ModelConfig)
    loss: LossConfig = _section(LossConfig)
    optim: OptimConfig = _section(OptimConfig)
    run: RunConfig = _section(RunConfig)
    parallel: ParallelConfig = _section(ParallelConfig)
    eval: EvalConfig = _section(EvalConfig)

    def validate(self) -> "TrainConfig":
        """ValueError naming the first key whose value is out of range or inconsistent."""
        for section in SECTIONS:
            getattr(self, section).validate()
        if self.parallel.tensor_parallel > 1 and self.model.lora:
            raise ValueError("tensor_parallel shards the model's own weights; it does not combine with lora")
        return self

    def loss_options(self) -> LossOptions:
        """The loss this config trains and evaluates: the loss section under the data's mode."""
        return self.loss.options(self.data.mode)

    def flat(self) -> Dict[str, Any]:
        """Every key and its value, in the sections' order: what config.yaml, the run's log and a
        checkpoint keep."""
        return {name: getattr(getattr(self, section), attr) for name, (section, attr) in KEYS.items()}

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.flat(), sort_keys=False))


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))

# flat key -> (section, field), in the sections' order; each key is in one section only
_CLASSES = {s.name: s.default_factory for s in dataclasses.fields(TrainConfig)}
KEYS: Dict[str, Tuple[str, str]] = {
    f.metadata.get("name", f.name): (section, f.name) for section, cls in _CLASSES.items() for f in dataclasses.fields(cls)
}
_TYPES = {name: typing.get_type_hints(_CLASSES[section])[attr] for name, (section, attr) in KEYS.items()}



def _number(name: str, value: Any, kind) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"{name} expects a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip()) if kind is float else int(value.strip())
        except ValueError:
            raise ValueError(f"{name} expects {'a number' if kind is float else 'an integer'}, got {value!r}") from None
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError(f"{name} expects an integer, got {value!r}")
        return value
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{name} expects a finite number, got {value!r}")
    return float(value)


def convert(name: str, value: Any) -> Any:
    """``value`` as field ``name``'s type, or ValueError naming the key."""
    kind = _TYPES[name]
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind in (int, float):
        return _number(name, value, kind)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} expects true or false, got {value!r}")
        return value
    if kind is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{name} expects a string, got {value!r}")
        return str(value)
    if typing.get_origin(kind) in (list, List) and typing.get_args(kind) == (float,):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} expects a list of numbers (or one number), got {value!r}")
        return [_number(f"{name}[{i}]", v, float) for i, v in enumerate(value)]
    if typing.get_origin(kind) in (list, List):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} expects a list of strings (or one string), got {value!r}")
        return list(value)
    if kind is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{name} expects a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"no conversion for config field {name} of type {kind}")


def _yaml_problem(exc) -> str:
    """What PyYAML says is wrong, and where (1-based line and column)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"


# Keys that name the same thing in two ways: setting one in a later layer (keyword arguments over the
# file, a key=value override over both) replaces the other from an earlier layer, so that a recipe's
# train_dataset gives way to train_files=... on the command line.
ALTERNATIVES = (("train_files", "train_dataset"),)


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None, **kwargs) -> TrainConfig:
    """Defaults <- YAML file <- ``kwargs`` <- ``key=value`` overrides; unknown keys and values of the wrong
    type raise ValueError naming the key (``validate()`` then checks ranges). Of two ALTERNATIVES, the
    later layer's wins."""
    layers = [_file_values(path) if path else {}, dict(kwargs), _override_values(overrides or [])]
    values: dict = {}
    for layer in layers:
        for group in ALTERNATIVES:
            if any(layer.get(k) for k in group):
                for k in group:
                    if k not in layer:
                        values.pop(k, None)
        values.update(layer)
    return from_flat(values, f" (in {path})" if path else "")


def from_flat(values: dict, where: str = "") -> TrainConfig:
    """A TrainConfig from flat keys, each converted to its type; an unknown key is a ValueError (naming
    ``where`` they came from)."""
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(map(str, unknown))}{where}")
    parts: dict = {section: {} for section in SECTIONS}
    for name, value in values.items():
        section, attr = KEYS[name]
        parts[section][attr] = convert(name, value)
    return TrainConfig(**{section: _CLASSES[section](**kw) for section, kw in parts.items()})


def _file_values(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({_yaml_problem(exc)}); fix that line") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a config file is a mapping of keys to values")
    return loaded


def _override_values(overrides: List[str]) -> dict:
    values = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        if key not in _TYPES:
            raise ValueError(f"unknown config key: {key}")
        try:
            values[key] = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: its value is not valid YAML ({_yaml_problem(exc)})") from None
    return values


def keys_help() -> str:
    """Every config key with its default and meaning, under its section (``safedpo train --help``)."""
    lines = []
    for section, cls in _CLASSES.items():
        lines.append(f"  # {section}: {cls.__doc__.strip()}")
        defaults = cls().__dict__
        for f in dataclasses.fields(cls):
            lines.append(f"  {f.metadata.get('name', f.name)} = {json.dumps(defaults[f.name])}\n      {f.metadata['help']}")
    return "\n".join(lines)


def normalized(flat: dict) -> dict:
    """A saved flat configuration with each key's value as this version types it (a checkpoint's
    ``loss_type: sigmoid`` is ['sigmoid'] now), so that a resume compares like with like; a value that
    no longer converts, and keys this version does not know, are kept as they were."""
    out = {}
    for name, value in flat.items():
        try:
            out[name] = convert(name, value) if name in KEYS else value
        except (ValueError, TypeError):
            out[name] = value
    return out


def config_json(cfg: TrainConfig) -> str:
    return json.dumps(cfg.flat(), sort_keys=True)
