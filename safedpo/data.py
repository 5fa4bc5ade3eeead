"""Preference data: PKU-SafeRLHF-style rows -> checked rows -> pairs for a mode -> token ids.

Columns (PKU-SafeRLHF's): prompt, response_0, response_1, is_response_0_safe, is_response_1_safe,
better_response_id, safer_response_id; ``columns`` maps these names to the file's own.

Modes, all trained with the same loss (``config.loss_flags`` gives its delta / swap / drop settings):
- safedpo:        y_w = better response, flags as given; the loss applies T and the delta margin.
- noswap:         as safedpo, but T does not swap (the NoSwap ablation).
- dpo-helpful:    y_w = better response, plain DPO.
- dpo-harmless:   y_w = safer response (safer_response_id), plain DPO.
- dpo-safebetter: pairs whose better response is unsafe are removed, plain DPO.
``safety_label_noise = p`` flips each safety flag with probability p (seeded) before anything else.

Tokenization: the tokenizer's chat template when it has one (one user turn, generation prompt added),
else the plain template "User: {prompt}\\nAssistant: ". The response is followed by EOS. Truncation: the
prompt keeps its last ``max_prompt_length`` tokens; then the response keeps its first
``max_length - len(prompt)`` tokens.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from safedpo_kernels.integrations.rows import response_id, safety_flag

COLUMNS = (
    "prompt",
    "response_0",
    "response_1",
    "is_response_0_safe",
    "is_response_1_safe",
    "better_response_id",
    "safer_response_id",
)
PLAIN_TEMPLATE = "User: {prompt}\nAssistant: "


class DataError(ValueError):
    """A malformed row: the message names the file, the row and the column."""


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    chosen_safe: bool
    rejected_safe: bool


@dataclass
class Example:
    prompt_ids: List[int]
    chosen_ids: List[int]
    rejected_ids: List[int]
    chosen_safe: bool
    rejected_safe: bool

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def _json_rows(path: Path) -> tuple:
    """(rows, where) of a .json (an array of objects, or JSON lines) or .jsonl file, each row as written:
    no column is cast to a common type, so a row is judged by its own values. ``where[i]`` names row i
    in errors: "line N" of a JSON-lines file (N as an editor counts, from 1), else "row N" (from 1)."""
    text = path.read_text()
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        where = [f"row {i + 1}" for i in range(len(rows))]
    else:
        rows, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {n}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            where.append(f"line {n}")
    for row, at in zip(rows, where):
        if not isinstance(row, dict):
            raise DataError(f"{path}, {at}: expected an object of columns, got {type(row).__name__}")
    return rows, where


def _load_table(path: str):
    """(rows, where) of a local file, or a saved dataset directory (no hub access); ``where[i]`` names row
    i in errors, or is None ("row i + 1"). JSON and CSV are read here, cell by cell, rather than by a
    loader that casts each column to one type (which would turn one 1.0 in a column of ints into floats
    for every row, and name the wrong row when a value is bad)."""
    p = Path(path)
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return ds, None
    kind = p.suffix.lower()
    if kind not in (".json", ".jsonl", ".parquet", ".csv"):
        raise DataError(f"{path}: unsupported data file type (json, jsonl, parquet, csv or a saved dataset directory)")
    if not p.exists():
        raise DataError(f"{path}: no such file")
    where = None
    if kind in (".json", ".jsonl"):
        rows, where = _json_rows(p)
    elif kind == ".csv":
        with open(p, newline="") as f:
            rows = list(csv.DictReader(f))
        where = [f"row {i + 1} (line {i + 2})" for i in range(len(rows))]  # line 1 is the header
    else:
        import datasets

        rows = datasets.load_dataset("parquet", data_files=str(p), split="train")
    if len(rows) == 0:
        raise DataError(f"{path}: no rows")
    return rows, where


def dataset_table(name: str, split: str, config: str = "", data_dir: str = ""):
    """One split of a data set: a directory written by ``save_to_disk``, or anything
    ``datasets.load_dataset`` takes -- a Hub id (downloaded when the machine is online) or a local
    directory of data files."""
    import datasets

    p = Path(name)
    if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{name}: no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(name, config or None, data_dir=data_dir or None, split=split)
    except (OSError, ValueError, ConnectionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"train_dataset {name!r}, split {split!r}: {first}") from None


def data_sources(data, split: str) -> list:
    """What a split's rows come from (``data``: the config's data section): files, or (label, table) of
    train_dataset's split."""
    if split == "train":
        files, dataset_split = data.train_files, data.train_split
    else:
        files, dataset_split = data.eval_files, data.eval_split
    if files:
        return list(files)
    if data.train_dataset and dataset_split:
        table = dataset_table(data.train_dataset, dataset_split, data.dataset_config, data.data_dir)
        return [(f"{data.train_dataset} [{dataset_split}]", table)]
    return []


def check_row(row: dict, where: str) -> dict:
    """The row with validated, normalized values, or DataError naming ``where`` and the column."""
    for col in COLUMNS:
        if col not in row:
            others = sorted(k for k in row if k not in COLUMNS)
            hint = (f"; the row has {others}: map one with columns: {{{col}: <its name>}}" if others else "")
            raise DataError(f"{where}, column {col!r}: missing{hint}")
        if row[col] is None:
            raise DataError(f"{where}, column {col!r}: missing (null)")
    out = {}
    for col in ("prompt", "response_0", "response_1"):
        if not isinstance(row[col], str) or not row[col].strip():
            raise DataError(f"{where}, column {col!r}: expected a non-empty string, got {row[col]!r}")
        out[col] = row[col]
    for k in (0, 1):
        col = f"is_response_{k}_safe"
        out[col] = safety_flag(row[col], f"{where}, column {col!r}", DataError)
    for col in ("better_response_id", "safer_response_id"):
        out[col] = response_id(row[col], f"{where}, column {col!r}", DataError)
    return out


def load_rows(files: Sequence, columns: Optional[dict] = None, skip_bad_rows: bool = False) -> Tuple[List[dict], int]:
    """Checked rows from all sources (file paths, or (label, table) pairs), in order, and the number of
    skipped malformed rows."""
    rename = {v: k for k, v in (columns or {}).items()}
    unknown = set((columns or {})) - set(COLUMNS)
    if unknown:
        raise DataError(f"columns: unknown standard column name(s) {sorted(unknown)}; they are {list(COLUMNS)}")
    rows, skipped = [], 0
    for source in files:
        path, (table, where) = (source[0], (source[1], None)) if isinstance(source, tuple) else (source, _load_table(source))
        for i, raw in enumerate(table):
            row = {rename.get(k, k): v for k, v in raw.items()}
            try:
                rows.append(check_row(row, f"{path}, {where[i] if where else f'row {i + 1}'}"))
            except DataError:
                if not skip_bad_rows:
                    raise
                skipped += 1
    return rows, skipped


def flip_safety_labels(rows: List[dict], p: float, seed: int) -> List[dict]:
    """Each safety flag flipped independently with probability p (the seed's label-noise ablation)."""
    if p <= 0:
        return rows
    rng = random.Random(seed)
    out = []
    for row in rows:
        row = dict(row)
        for col in ("is_response_0_safe", "is_response_1_safe"):
            if rng.random() < p:
                row[col] = not row[col]
        out.append(row)
    return out


def build_pairs(rows: List[dict], mode: str) -> List[Pair]:
    """Pairs (preferred first) for a mode; see the module docstring."""
    pairs = []
    for row in rows:
        w = row["safer_response_id"] if mode == "dpo-harmless" else row["better_response_id"]
        l = 1 - w
        pair = Pair(
            prompt=row["prompt"],
            chosen=row[f"response_{w}"],
            rejected=row[f"response_{l}"],
            chosen_safe=row[f"is_response_{w}_safe"],
            rejected_safe=row[f"is_response_{l}_safe"],
        )
        if mode == "dpo-safebetter" and not pair.chosen_safe:
            continue
        pairs.append(pair)
    return pairs


def prompt_text(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(prompt=prompt)


# Text is cut to this many characters per token kept before it is tokenized: no tokenizer's tokens are
# that long on average, and an absurdly long response (21 MB of text takes about 3 GB to tokenize) costs
# nothing.
CHARS_PER_TOKEN = 64


def encode_prompt(tokenizer, prompt: str, max_prompt_length: int) -> List[int]:
    prompt = prompt[-max_prompt_length * CHARS_PER_TOKEN:]  # the end is what is kept
    ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
    return ids[-max_prompt_length:]


def encode_pairs(pairs: List[Pair], tokenizer, max_prompt_length: int, max_length: int) -> List[Example]:
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def response(text: str, room: int) -> list:
        # Cut the text before tokenizing, so that an absurdly long response costs nothing.
        text = text[: max(room, 1) * CHARS_PER_TOKEN]
        return (tokenizer(text, add_special_tokens=False)["input_ids"] + eos)[:room]

    examples = []
    for pair in pairs:
        prompt_ids = encode_prompt(tokenizer, pair.prompt, max_prompt_length)
        room = max_length - len(prompt_ids)
        examples.append(Example(prompt_ids, response(pair.chosen, room), response(pair.rejected, room), pair.chosen_safe,
                                pair.rejected_safe))
    return examples


def load_examples(data, tokenizer, files: Sequence, seed: int) -> Tuple[List[Example], dict]:
    """Sources (see ``data_sources``) -> examples for the data section's mode, label noise (drawn from
    ``seed``) and lengths; also a small report of what happened."""
    rows, skipped = load_rows(files, data.columns, data.skip_bad_rows)
    rows = flip_safety_labels(rows, data.safety_label_noise, seed)
    pairs = build_pairs(rows, data.mode)
    examples = encode_pairs(pairs, tokenizer, data.max_prompt_length, data.max_length)
    return examples, dict(rows=len(rows), skipped_rows=skipped, pairs=len(pairs))
