"""SafeDPO training: config -> data -> policy and reference -> loop with eval and checkpoints.

One process, or many under ``torchrun --nproc_per_node=K`` (DDP; FSDP2 with fsdp=true). Every optimizer
step sees one global batch of ``batch_size x world_size x grad_accum`` pairs, and its loss is the mean
over the kept pairs of that whole global batch, however it is split across ranks and micro-batches.
The pieces live beside this file: distributed.py (processes, DDP/FSDP), ref_logps.py (reference
log-probs), checkpoint.py, evaluate.py.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from safedpo_kernels.integrations.hf import router_config
from safedpo_kernels.loss import safety_transform
from safedpo_kernels.options import LossOptions

from .checkpoint import (
    load_checkpoint,
    load_sharded_checkpoint,
    remove_leftovers,
    resume_point,
    save_checkpoint,
    save_sharded_checkpoint,
    seed_everything,
)
from .collate import batch_stream, make_batch
from .config import TrainConfig, config_json
from .data import data_sources, load_examples
from .distributed import Dist, full_model_state, rank_slice, wrap_distributed
from .evaluate import evaluate_pairs, reward_stats
from .model import PolicyLogps, apply_lora, build_model, load_tokenizer, quiet_libraries
from .progress import Progress
from .ref_logps import Reference


def cosine_schedule(optimizer, warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class MetricsLog:
    """metrics.jsonl (and TensorBoard when asked), written by the main process only."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.file = open(out_dir / "metrics.jsonl", "a") if enabled else None
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict, step=None) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
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


def prepare_output_dir(out_dir: Path, ckpt, overwrite: bool) -> None:
    """Refuse to start afresh over another run's checkpoints or metrics (a later resume: auto would pick
    up that run) unless ``overwrite``, which deletes them; remove what a crash left mid-save."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_dir)
    if ckpt is not None:
        return
    previous = [p for p in (out_dir / "checkpoints", out_dir / "metrics.jsonl", out_dir / "final") if p.exists()]
    if previous and not overwrite:
        raise ValueError(
            f"output_dir {str(out_dir)!r} holds another run ({', '.join(p.name for p in previous)}): set resume: auto "
            "to continue it, another output_dir, or overwrite_output_dir: true to delete it and start afresh"
        )
    for path in previous + [out_dir / "tensorboard"]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after ``step`` (a run resumed from step k logs steps k + 1... again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by the crash
        if record.get("step", 0) <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))


def train_step(wrapped, reference, micro: list, options: LossOptions, dd: Dist, aux_coef: float = 0.0) -> dict:
    """Forward and backward over one global batch's micro-batches; gradients left in the parameters.

    Each micro-batch's loss is the sum over its kept pairs; with ``options.reduction`` "mean" it is
    divided by the kept pairs of the whole global batch (known from the safety flags before any
    forward), so the step's gradient is that of the global mean (or sum) however the batch is split.
    A mixture-of-experts router's load-balancing loss is added with ``aux_coef`` (as TRL does), averaged
    over the micro-batches, and logged as aux_loss.
    """
    kept_here = sum(int(safety_transform(b["chosen_safe"], b["rejected_safe"], options).kept.sum()) for b in micro)
    (global_kept,) = dd.sum([kept_here])
    # DDP averages gradients over the ranks: world / global kept makes the step the global mean.
    scale = dd.world / max(global_kept, 1.0) if options.reduction == "mean" else float(dd.world)
    per_batch = options.replace(reduction="sum")
    loss_sum = correct = margin = tokens = aux_sum = 0.0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dd.device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for b in micro:
        with autocast:
            out, aux = wrapped(b, loss=per_batch, ref_logps=reference(b))
        total = out.loss * scale
        if aux is not None:  # the router's load-balancing loss, averaged over the micro-batches
            total = total + aux_coef * aux / len(micro)
            aux_sum += float(aux.detach()) / len(micro)
        total.backward()
        loss_sum += float(out.loss.detach())
        c, m = reward_stats(out)
        correct += c
        margin += m
        tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
    loss_sum, correct, margin, tokens, aux_sum = dd.sum([loss_sum, correct, margin, tokens, aux_sum])
    kept = max(global_kept, 1)
    loss = loss_sum / kept if options.reduction == "mean" else loss_sum
    stats = dict(loss=loss, reward_accuracy=correct / kept, margin=margin / kept, kept=int(global_kept), tokens=tokens)
    if aux_coef:
        stats["aux_loss"] = aux_sum / dd.world
    return stats


class Run:
    """One training run, set up from its config: processes, output directory, data, policy, reference,
    optimizer and schedule, restored from a checkpoint when resuming. ``step()`` takes one optimizer step;
    ``finish()`` evaluates, saves and returns the last metrics."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        quiet_libraries()
        self.cfg = cfg
        self.dd = dd = Dist(cfg.device)
        self.out_dir = Path(cfg.output_dir)
        ckpt = resume_point(cfg.resume, self.out_dir)
        if dd.main:
            prepare_output_dir(self.out_dir, ckpt, cfg.overwrite_output_dir)
            cfg.save(self.out_dir / "config.yaml")
        dd.barrier()
        seed_everything(cfg.seed)

        self.tok = load_tokenizer(cfg.tokenizer or cfg.model)
        self.train_set, report = load_examples(cfg, self.tok, data_sources(cfg, "train"))
        eval_sources = data_sources(cfg, "eval")
        self.eval_set = load_examples(cfg, self.tok, eval_sources)[0] if eval_sources else []
        self.policy, self.packed, self.aux_coef = self._policy()
        self.reference = Reference(cfg, self.policy, {"train": self.train_set, "eval": self.eval_set}, self.tok, dd, self.packed)
        self.options = cfg.loss_options()
        self.wrapped = wrap_distributed(self.policy, cfg.fsdp, dd)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = cosine_schedule(self.optimizer, cfg.warmup_steps, cfg.max_steps)
        self.sharded = cfg.fsdp and dd.world > 1
        # Under FSDP the policy's parameters are shards: every rank takes part in an evaluation's forwards.
        self.evaluator = dd.main or self.sharded

        self.step_count, self.position = 0, 0
        if ckpt is not None:
            self._restore(ckpt)
        self.stream = batch_stream([len(e) for e in self.train_set], cfg.batch_size * dd.world, cfg.seed, start=self.position)
        self.log = MetricsLog(self.out_dir, dd.main, cfg.tensorboard)
        if self.step_count == 0:
            self.log.write(dict(event="start", config=json.loads(config_json(cfg)), **report))
        self.end = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else cfg.max_steps
        self.bar = Progress(cfg.max_steps, cfg.mode, initial=self.step_count, disable=not (dd.main and cfg.progress))
        self.last: dict = {}
        self.t_last = time.perf_counter()

    def _policy(self) -> tuple:
        """(PolicyLogps, packed batches?, router loss coefficient): the model (with LoRA adapters when asked),
        packed batches with flash-attention unless padding_free says otherwise, and a mixture-of-experts
        router's load-balancing loss at the config's coefficient (default: the model config's)."""
        cfg = self.cfg
        model = build_model(cfg, len(self.tok), self.dd.device)
        if cfg.lora:
            model = apply_lora(model, cfg.lora)
        packed = cfg.padding_free
        if packed is None:
            packed = model.config._attn_implementation == "flash_attention_2"
        router = router_config(model)
        aux_coef = 0.0
        if router is not None:
            aux_coef = router["coef"] if cfg.router_aux_loss_coef is None else cfg.router_aux_loss_coef
        return PolicyLogps(model, cfg.loss_input, cfg.average_logps, cfg.backend, router_aux=aux_coef > 0), packed, aux_coef

    def _restore(self, ckpt) -> None:
        if self.sharded:
            self.step_count, self.position = load_sharded_checkpoint(ckpt, self.policy, self.optimizer, self.scheduler,
                                                                     self.dd.rank, self.dd.world)
        else:
            self.step_count, self.position = load_checkpoint(ckpt, self.policy.model, self.optimizer, self.scheduler)
        if self.dd.main:
            truncate_metrics(self.out_dir / "metrics.jsonl", self.step_count)

    def save(self) -> None:
        """A checkpoint of this step: FSDP shards from every rank, or the whole state from the main process."""
        dd, cfg = self.dd, self.cfg
        if self.sharded:
            save_sharded_checkpoint(self.out_dir, self.step_count, self.policy, self.optimizer, self.scheduler, self.position,
                                    dd.rank, dd.world, dd.barrier, cfg.save_total_limit)
        elif dd.main:
            save_checkpoint(self.out_dir, self.step_count, self.policy.model, self.optimizer, self.scheduler, self.position,
                            cfg.save_total_limit)

    def evaluate(self) -> dict:
        return evaluate_pairs(self.policy, self.reference, self.eval_set, self.cfg, self.tok.pad_token_id, self.packed,
                              self.dd.device)

    def _micro_batches(self) -> list:
        micro = []
        for _ in range(self.cfg.grad_accum):
            position, indices = next(self.stream)
            self.position = position + 1  # the stream position after this batch
            indices = rank_slice(indices, self.dd.rank, self.dd.world)
            micro.append(make_batch(self.train_set, indices, self.tok.pad_token_id, self.packed, self.dd.device))
        return micro

    def step(self) -> None:
        """One optimizer step over a global batch; then its metrics, evaluation and checkpoint as configured."""
        cfg, dd = self.cfg, self.dd
        stats = train_step(self.wrapped, self.reference, self._micro_batches(), self.options, dd, self.aux_coef)
        params = self.policy.parameters()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm) if cfg.clip_grad_norm > 0 else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1

        now = time.perf_counter()
        tokens = stats.pop("tokens")
        self.last = dict(step=self.step_count, **stats, lr=self.scheduler.get_last_lr()[0],
                         grad_norm=float(grad_norm) if grad_norm is not None else None,
                         tokens_per_s=tokens / max(now - self.t_last, 1e-9))
        self.t_last = now
        if cfg.eval_every and self.step_count % cfg.eval_every == 0 and self.eval_set and self.evaluator:
            self.last.update(self.evaluate())
        if dd.main:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", acc=f"{self.last['reward_accuracy']:.2f}",
                                 tok_s=f"{self.last['tokens_per_s']:.0f}")
            if self.step_count % cfg.log_every == 0 or self.step_count == self.end:
                self.log.write(self.last, self.step_count)
        if cfg.save_every and self.step_count % cfg.save_every == 0 and self.step_count < self.end:
            self.save()
        dd.barrier()

    def finish(self) -> dict:
        """A last evaluation (unless the last step had one), the final checkpoint and model (with LoRA: the
        adapters, or with merge_lora the model with them merged in), and the last metrics."""
        cfg, dd = self.cfg, self.dd
        self.bar.close()
        evaluated = cfg.eval_every and self.step_count % cfg.eval_every == 0
        if self.eval_set and self.evaluator and not evaluated:
            self.last.update(self.evaluate())
            self.log.write(dict(event="eval", **self.last))
        self.save()
        final = self.out_dir / "final"
        if self.sharded:
            state = full_model_state(self.policy.model)
            if dd.main:
                self.policy.model.save_pretrained(final, state_dict=state)
        elif dd.main:
            (self.policy.model.merge_and_unload() if cfg.merge_lora else self.policy.model).save_pretrained(final)
        if dd.main:
            self.tok.save_pretrained(final)
        self.log.close()
        dd.barrier()
        return dict(self.last, output_dir=str(self.out_dir))


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; returns the last logged metrics (rank 0) and the output directory."""
    run = Run(cfg)
    run.policy.train()
    while run.step_count < run.end:
        run.step()
    return run.finish()
