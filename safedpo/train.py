"""SafeDPO training: config -> data -> policy and reference -> loop with eval and checkpoints.

One process, or many under ``torchrun --nproc_per_node=K`` (DDP; FSDP2 with fsdp=true). Every optimizer
step sees one global batch of ``batch_size x world_size x grad_accum`` pairs, and its loss is the mean
over the kept pairs of that whole global batch, however it is split across ranks and micro-batches.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from safedpo_kernels._loss import check_loss_hparams, loss_from_logps

from .collate import batch_stream, collate_packed, collate_padded
from .config import TrainConfig, config_json
from .data import load_examples, loss_flags
from .model import PolicyLogps, build_model, load_tokenizer, quiet_libraries


# ----------------------------------------------------------------------------- process set-up


class Dist:
    """Rank, world size and device of this process (a single process is rank 0 of 1)."""

    def __init__(self, device_pref: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
        self.device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values) -> list:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- batches


def make_batch(examples, indices, pad_id: int, packed: bool, device) -> dict:
    chunk = [examples[i] for i in indices]
    batch = collate_packed(chunk) if packed else collate_padded(chunk, pad_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["index"] = torch.tensor(indices, device=device)
    return batch


def kept_mask(batch: dict, drop_both_unsafe: bool) -> torch.Tensor:
    """Pairs the loss keeps (T drops a both-unsafe pair when drop_both_unsafe)."""
    both_unsafe = ~batch["chosen_safe"] & ~batch["rejected_safe"]
    return ~both_unsafe if drop_both_unsafe else torch.ones_like(both_unsafe)


def rank_slice(indices, rank: int, world: int):
    per = len(indices) // world
    return indices[rank * per : (rank + 1) * per]


# ----------------------------------------------------------------------------- reference log-probs


def fingerprint_model(model) -> str:
    h = hashlib.sha256()
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
def compute_ref_logps(ref_policy: PolicyLogps, examples, batch_size: int, pad_id: int, packed: bool, device, progress=False):
    """(n_examples, 2) float32: the reference's (chosen, rejected) sequence log-probs, in example order."""
    from tqdm.auto import tqdm

    out = torch.empty(len(examples), 2)
    starts = range(0, len(examples), batch_size)
    for s in tqdm(starts, desc="reference log-probs", disable=not progress, leave=False):
        idx = list(range(s, min(s + batch_size, len(examples))))
        logps = ref_policy(make_batch(examples, idx, pad_id, packed, device)).float().cpu()
        out[idx, 0], out[idx, 1] = logps[: len(idx)], logps[len(idx) :]
    return out


class Reference:
    """ref_logps for a batch: from the on-disk cache (precompute) or a frozen model copy (live)."""

    def __init__(self, cfg: TrainConfig, policy: PolicyLogps, sets: dict, tok, dd: Dist, packed: bool):
        self.mode = cfg.reference
        self.packed = packed
        if cfg.reference_model:
            model = build_model(cfg, len(tok), dd.device, path=cfg.reference_model)
        else:
            model = copy.deepcopy(policy.model)
        model.eval().requires_grad_(False)
        self.policy = PolicyLogps(model, policy.loss_input, policy.average, policy.backend)
        self.tables = {}
        if self.mode == "live":
            return
        cache = Path(cfg.cache_dir or Path(cfg.output_dir).parent / ".cache")
        model_fp = fingerprint_model(model)
        for name, examples in sets.items():
            key = f"ref-{model_fp}-{fingerprint_examples(examples)}-{'avg' if cfg.average_logps else 'sum'}"
            path = cache / f"{key}.pt"
            if dd.main and not path.exists():
                table = compute_ref_logps(self.policy, examples, 2 * cfg.batch_size, tok.pad_token_id, packed, dd.device, cfg.progress)
                cache.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(table, tmp)
                os.replace(tmp, path)  # a crash never leaves a half-written cache file
            dd.barrier()
            self.tables[name] = torch.load(path)
        self.policy = None  # precomputed: the reference model is not kept in memory

    @torch.no_grad()
    def __call__(self, batch: dict, split: str = "train") -> torch.Tensor:
        if self.mode == "live":
            return self.policy(batch).float()
        t = self.tables[split][batch["index"].cpu()]
        return torch.cat([t[:, 0], t[:, 1]]).to(batch["input_ids"].device)


# ----------------------------------------------------------------------------- checkpoints


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    ckpts = sorted((output_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, position: int) -> Path:
    """Written to a temporary directory, then renamed: a crash never leaves a half checkpoint."""
    root = output_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(
        dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
             rng=rng_state(), position=position, step=step),
        tmp / "state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


# ----------------------------------------------------------------------------- evaluation


def reward_stats(out) -> tuple:
    """(pairs whose chosen reward beats the rejected one, summed reward margin), over the kept pairs."""
    correct = int(((out.chosen_rewards > out.rejected_rewards) & out.kept).sum())
    margin = float(((out.chosen_rewards - out.rejected_rewards) * out.kept).sum())
    return correct, margin


@torch.no_grad()
def evaluate_pairs(policy: PolicyLogps, reference: Reference, examples, cfg: TrainConfig, pad_id: int, packed: bool, device) -> dict:
    """Held-out loss, reward accuracy, safe-over-unsafe accuracy and mean margin (see README)."""
    flags = loss_flags(cfg.mode, cfg.delta)
    totals = dict(loss=0.0, kept=0, correct=0, margin=0.0, mixed=0, safe_wins=0)
    policy.eval()
    for s in range(0, len(examples), cfg.batch_size):
        idx = list(range(s, min(s + cfg.batch_size, len(examples))))
        batch = make_batch(examples, idx, pad_id, packed, device)
        logps = policy(batch).float()
        ref = reference(batch, "eval")
        out = loss_from_logps(logps, ref, batch["chosen_safe"], batch["rejected_safe"], cfg.beta,
                              label_smoothing=cfg.label_smoothing, **flags)
        k = int(out.kept.sum())
        totals["loss"] += float(out.loss) * k
        totals["kept"] += k
        c, m = reward_stats(out)
        totals["correct"] += c
        totals["margin"] += m
        # Safe over unsafe, on the data's own pairs (before T): one safe and one unsafe response.
        B = len(idx)
        reward = cfg.beta * (logps - ref)
        cs, rs = batch["chosen_safe"], batch["rejected_safe"]
        mixed = cs != rs
        safe_higher = torch.where(cs, reward[:B] > reward[B:], reward[B:] > reward[:B])
        totals["mixed"] += int(mixed.sum())
        totals["safe_wins"] += int((safe_higher & mixed).sum())
    policy.train()
    kept = max(totals["kept"], 1)
    return dict(
        eval_loss=totals["loss"] / kept,
        eval_reward_accuracy=totals["correct"] / kept,
        eval_margin=totals["margin"] / kept,
        eval_safe_over_unsafe=totals["safe_wins"] / max(totals["mixed"], 1),
        eval_pairs=len(examples),
    )


# ----------------------------------------------------------------------------- training


def cosine_schedule(optimizer, warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def full_model_state(model) -> dict:
    """The whole FSDP-sharded model's state dict, gathered to the CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def wrap_distributed(policy: PolicyLogps, cfg: TrainConfig, dd: Dist):
    if dd.world == 1:
        return policy
    if cfg.fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        for layer in policy.model.get_decoder().layers:
            fully_shard(layer)
        fully_shard(policy)
        return policy
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(policy, device_ids=[dd.device.index] if dd.device.type == "cuda" else None)


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; returns the last logged metrics (rank 0) and the output directory."""
    from tqdm.auto import tqdm

    cfg.validate()
    check_loss_hparams(cfg.beta, cfg.delta, cfg.label_smoothing)
    quiet_libraries()
    dd = Dist(cfg.device)
    if cfg.fsdp and dd.world > 1 and (cfg.save_every or cfg.resume not in ("none", "", "auto")):
        raise ValueError("fsdp=true saves the final model only: set save_every=0 and resume=none (resumable "
                         "FSDP checkpoints are not implemented yet)")
    out_dir = Path(cfg.output_dir)
    if dd.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")
    seed_everything(cfg.seed)

    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    train_set, report = load_examples(cfg, tok, cfg.train_files)
    eval_set = load_examples(cfg, tok, cfg.eval_files)[0] if cfg.eval_files else []
    model = build_model(cfg, len(tok), dd.device)
    packed = model.config._attn_implementation == "flash_attention_2"
    policy = PolicyLogps(model, cfg.loss_input, cfg.average_logps, cfg.backend)
    reference = Reference(cfg, policy, {"train": train_set, "eval": eval_set}, tok, dd, packed)
    flags = loss_flags(cfg.mode, cfg.delta)

    wrapped = wrap_distributed(policy, cfg, dd)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, cfg.max_steps)

    step, position = 0, 0
    ckpt = None
    if cfg.resume == "auto":
        ckpt = latest_checkpoint(out_dir)
    elif cfg.resume not in ("none", ""):
        ckpt = Path(cfg.resume)
    if ckpt is not None:
        state = torch.load(ckpt / "state.pt", weights_only=False)
        policy.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, position = state["step"], state["position"]

    global_batch = cfg.batch_size * dd.world
    lengths = [len(e) for e in train_set]
    stream = batch_stream(lengths, global_batch, cfg.seed, start=position)
    writer = None
    if cfg.tensorboard and dd.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))
    metrics_file = open(out_dir / "metrics.jsonl", "a") if dd.main else None
    if dd.main and step == 0:
        metrics_file.write(json.dumps(dict(event="start", config=json.loads(config_json(cfg)), **report)) + "\n")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dd.device.type == "cuda" else torch.autocast("cpu", enabled=False)
    bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.mode, disable=not (dd.main and cfg.progress), dynamic_ncols=True)
    last = {}
    policy.train()
    t_last, tokens = time.perf_counter(), 0
    end = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else cfg.max_steps
    # Under FSDP the policy's parameters are shards: every rank takes part in an evaluation's forwards.
    evaluator = dd.main or (cfg.fsdp and dd.world > 1)
    while step < end:
        micro = []
        for _ in range(cfg.grad_accum):
            position, indices = next(stream)
            position += 1  # the stream position after this batch
            micro.append(make_batch(train_set, rank_slice(indices, dd.rank, dd.world), tok.pad_token_id, packed, dd.device))
        # Normalize by the kept pairs of the whole global batch, known from the flags before any forward.
        kept_local = [int(kept_mask(b, flags["drop_both_unsafe"]).sum()) for b in micro]
        (global_kept,) = dd.sum([sum(kept_local)])
        loss_sum = correct = margin = 0.0
        for b, k in zip(micro, kept_local):
            ref = reference(b)
            with autocast:
                logps = wrapped(b).float()
            out = loss_from_logps(logps, ref, b["chosen_safe"], b["rejected_safe"], cfg.beta, label_smoothing=cfg.label_smoothing, **flags)
            (out.loss * (k * dd.world / max(global_kept, 1.0))).backward()
            loss_sum += float(out.loss.detach()) * k
            c, m = reward_stats(out)
            correct += c
            margin += m
            tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.clip_grad_norm) if cfg.clip_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_sum, correct, margin, tokens_all = dd.sum([loss_sum, correct, margin, tokens])
        tokens = 0
        now = time.perf_counter()
        last = dict(step=step, loss=loss_sum / max(global_kept, 1), reward_accuracy=correct / max(global_kept, 1),
                    margin=margin / max(global_kept, 1), kept=int(global_kept), lr=scheduler.get_last_lr()[0],
                    grad_norm=float(grad_norm) if grad_norm is not None else None,
                    tokens_per_s=tokens_all / max(now - t_last, 1e-9))
        t_last = now
        if cfg.eval_every and step % cfg.eval_every == 0 and eval_set and evaluator:
            last.update(evaluate_pairs(policy, reference, eval_set, cfg, tok.pad_token_id, packed, dd.device))
        if dd.main:
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['reward_accuracy']:.2f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if step % cfg.log_every == 0 or step == end:
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                if writer:
                    for k, v in last.items():
                        if isinstance(v, (int, float)):
                            writer.add_scalar(k, v, step)
            if cfg.save_every and step % cfg.save_every == 0 and step < end:
                save_checkpoint(out_dir, step, policy.model, optimizer, scheduler, position)
        dd.barrier()
    bar.close()
    if eval_set and evaluator and not (cfg.eval_every and step % cfg.eval_every == 0):
        last.update(evaluate_pairs(policy, reference, eval_set, cfg, tok.pad_token_id, packed, dd.device))
        if dd.main:
            metrics_file.write(json.dumps(dict(event="eval", **last)) + "\n")
    if cfg.fsdp and dd.world > 1:
        state = full_model_state(policy.model)
        if dd.main:
            policy.model.save_pretrained(out_dir / "final", state_dict=state)
    elif dd.main:
        save_checkpoint(out_dir, step, policy.model, optimizer, scheduler, position)
        policy.model.save_pretrained(out_dir / "final")
    if dd.main:
        tok.save_pretrained(out_dir / "final")
        metrics_file.close()
        if writer:
            writer.close()
    dd.barrier()
    return dict(last, output_dir=str(out_dir))
