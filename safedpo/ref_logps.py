"""The reference policy's sequence log-probs for the trainer: precomputed once and cached on disk, or
computed live. (Not to be confused with safedpo_kernels.reference, the float64 oracle of the kernels.)"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from .collate import make_batch
from .model import PairScorer, is_lora
from .outputs import writing
from .progress import progress as iterate

# Config entries that say where a model was loaded from or how it runs, not what it computes (the
# weights' bytes already carry their dtype).
_PLACE_KEYS = frozenset({"_name_or_path", "_commit_hash", "transformers_version", "attn_implementation",
                         "_attn_implementation", "_attn_implementation_autoset", "torch_dtype", "dtype"})


def fingerprint_model(model) -> str:
    """The weights and the configuration: a config-only change (a soft-cap, a logit scale, RoPE's base,
    a norm's epsilon) changes the log-probs without changing a weight."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        kept = {k: v for k, v in config.to_dict().items() if k not in _PLACE_KEYS}
        h.update(json.dumps(kept, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_examples(examples) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt_ids, e.chosen_ids, e.rejected_ids]).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_ref_logps(ref_policy: PairScorer, examples, batch_size: int, pad_id: int, packed: bool, device, progress=False):
    """(n_examples, 2) float32: the reference's (chosen, rejected) sequence log-probs, in example order."""
    out = torch.empty(len(examples), 2)
    starts = range(0, len(examples), batch_size)
    for s in iterate(starts, "reference log-probs", disable=not progress):
        idx = list(range(s, min(s + batch_size, len(examples))))
        logps = ref_policy(make_batch(examples, idx, pad_id, packed, device)).float().cpu()
        out[idx, 0], out[idx, 1] = logps[: len(idx)], logps[len(idx) :]
    return out


class _AdaptersOff(torch.nn.Module):
    """The policy itself with its LoRA adapters disabled, in eval mode: the reference without a copy."""

    def __init__(self, policy: PairScorer):
        super().__init__()
        self.policy = policy

    @torch.no_grad()
    def forward(self, batch: dict) -> torch.Tensor:
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.model.disable_adapter():
                return self.policy(batch)
        finally:
            self.policy.train(was_training)


class Precompute(NamedTuple):
    """How reference tables are precomputed: where they are cached, how many pairs a forward takes, and
    whether a progress bar shows it."""

    cache_dir: Path
    pairs: int
    progress: bool


class ReferenceLogps:
    """ref_logps for a batch: from the on-disk cache (``loss.reference`` "precompute") or a reference model
    (``live``); ``loss`` is the config's loss section.

    The reference is ``reference`` (the model loss.reference_model names, built by the caller), else the
    initial policy: with LoRA the policy itself with its adapters disabled (never a second copy),
    otherwise a frozen copy. The cache key is made of the reference model's fingerprint (weights and
    configuration) and the tokenized data's, so a cached table is only reused for the same model and the
    same examples.
    """

    def __init__(self, loss, policy: PairScorer, sets: dict, tok, procs, packed: bool, precompute: Optional[Precompute],
                 reference=None):
        self.mode = loss.reference
        self.packed = packed
        if reference is not None or not is_lora(policy.model):
            if reference is not None:
                model = reference
            else:
                model = copy.deepcopy(policy.model)
            model.eval().requires_grad_(False)
            self.policy = PairScorer(model, policy.loss_input, policy.average, policy.backend)
        else:
            model = policy.model
            self.policy = _AdaptersOff(policy)
        self.tables = {}
        if self.mode == "live":
            return
        cache = precompute.cache_dir
        model_fp = fingerprint_model(model)
        for name, examples in sets.items():
            key = f"ref-{model_fp}-{fingerprint_examples(examples)}-{'avg' if loss.average_logps else 'sum'}"
            path = cache / f"{key}.pt"
            if procs.main and not path.exists():
                table = compute_ref_logps(self.policy, examples, 2 * precompute.pairs, tok.pad_token_id, packed,
                                          procs.device, precompute.progress)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                with writing("the reference log-prob cache", path, "set cache_dir elsewhere or free some space"):
                    try:
                        cache.mkdir(parents=True, exist_ok=True)
                        torch.save(table, tmp)
                        os.replace(tmp, path)  # a crash never leaves a half-written cache file
                    finally:
                        tmp.unlink(missing_ok=True)
            procs.barrier()
            self.tables[name] = torch.load(path, weights_only=True)
        self.policy = None  # precomputed: the reference model is not kept in memory

    @torch.no_grad()
    def __call__(self, batch: dict, split: str = "train") -> torch.Tensor:
        if self.mode == "live":
            return self.policy(batch).float()
        t = self.tables[split][batch["index"].cpu()]
        return torch.cat([t[:, 0], t[:, 1]]).to(batch["input_ids"].device)
