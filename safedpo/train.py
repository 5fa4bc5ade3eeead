"""SafeDPO training: config -> data -> policy and reference -> loop with eval and checkpoints.

One process, or many under ``torchrun --nproc_per_node=K`` (DDP; FSDP2 with fsdp=true). Every optimizer
step sees one global batch of ``batch_size x data-parallel ranks x grad_accum`` pairs (data-parallel ranks:
world_size / tensor_parallel), and its loss is the mean
over the kept pairs of that whole global batch, however it is split across ranks and micro-batches.
The pieces live beside this file: distributed.py (processes, DDP/FSDP), ref_logps.py (reference
log-probs), checkpoint.py, run_dir.py (the output directory and the metrics log), guards.py (non-finite
steps, stop signals), evaluate.py.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

from safedpo_kernels import available_backends, loss_denominators
from safedpo_kernels.integrations.hf import compile_context, router_config, token_metric_sums, token_metrics
from safedpo_kernels.options import LossOptions

from .checkpoint import (
    Position,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    load_sharded_checkpoint,
    resume_point,
    save_checkpoint,
    save_sharded_checkpoint,
    saved_config,
    saved_counters,
    seed_everything,
)
from .collate import batch_stream, make_batch
from .config import TrainConfig, config_json, normalized
from .data import data_sources, load_examples
from .distributed import Dist, clip_grad_norm, full_model_state, rank_slice, wrap_distributed
from .evaluate import evaluate_pairs, reward_stats
from .guards import Interrupted, NonFiniteError, StopSignals, finite_or_none, grads_finite, weights_finite
from .model import PairScorer, apply_lora, build_model, check_token_ids, config_tokenizer, quiet_libraries
from .outputs import writing
from .progress import Progress
from .ref_logps import Precompute, ReferenceLogps
from .run_dir import MetricsLog, config_changes, prepare_output_dir, refuse_another_run, truncate_metrics


def cosine_schedule(optimizer, warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(wrapped, reference, micro: list, options: LossOptions, procs: Dist, aux_coef: float = 0.0) -> dict:
    """Forward and backward over one global batch's micro-batches; gradients left in the parameters.

    With ``options.reduction`` "mean" each micro-batch's loss divides by the divisors of the whole global
    batch -- its kept pairs, and for an "sft" term the tokens of their preferred responses, known from the
    safety flags and the labels before any forward (``loss_denominators``) -- so that the micro-batches'
    losses add up to the global-batch loss, and the step's gradient is its gradient, however the batch
    is split over micro-batches and ranks; with "sum" they are plain sums. A mixture-of-experts router's
    load-balancing loss is added with ``aux_coef`` (as TRL does), averaged over the micro-batches, and
    logged as aux_loss. ``micro_losses``: this rank's loss of each micro-batch (what was backpropagated);
    ``nonfinite_pairs``: the per-pair outputs of those that are not finite. Each term of a loss_type
    list is logged as ``loss/<name>``, and when the policy computes token statistics, TRL's entropy,
    logits/chosen, logits/rejected and mean_token_accuracy over the global batch.
    """
    here = [loss_denominators(b["token_counts"], b["chosen_safe"], b["rejected_safe"], options) for b in micro]
    global_kept, global_tokens = procs.sum([sum(float(k) for k, _ in here), sum(float(t) for _, t in here)])
    # As tensors: a compiled forward then neither recompiles for new counts nor breaks its graph on them.
    denominators = None
    if options.reduction == "mean":
        denominators = torch.tensor([global_kept, global_tokens], dtype=torch.float64, device=procs.device).unbind()
    scale = float(procs.data_world)  # DDP and FSDP average the gradients over the data-parallel ranks
    loss_sum = correct = margin = tokens = aux_sum = 0.0
    term_sums = [0.0] * len(options.terms)
    token_sums = torch.zeros(7, dtype=torch.float64)
    micro_losses, nonfinite_pairs = [], []
    on_cuda = procs.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else torch.autocast("cpu", enabled=False)
    for i, b in enumerate(micro):
        with autocast:
            out, aux = wrapped(b, loss=options, ref_logps=reference(b), denominators=denominators)
        total = out.loss * scale
        if aux is not None:  # the router's load-balancing loss, averaged over the micro-batches
            total = total + aux_coef * aux / len(micro)
            aux_sum += float(aux.detach()) / len(micro)
        total.backward()
        micro_losses.append(float(total.detach()))
        if not math.isfinite(micro_losses[-1]):  # what the diagnosis of a non-finite step shows
            nonfinite_pairs.append(dict(micro_batch=i, **{k: getattr(out, k).tolist() for k in PAIR_FIELDS}))
        loss_sum += float(out.loss.detach())
        term_sums = [s + float(t) for s, t in zip(term_sums, out.loss_terms)]
        if out.token_stats is not None:
            token_sums += token_metric_sums(out.token_stats).cpu()
        c, m = reward_stats(out)
        correct += c
        margin += m
        tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
    loss, correct, margin, tokens, aux_sum, *rest = procs.sum([loss_sum, correct, margin, tokens, aux_sum, *term_sums,
                                                               *token_sums.tolist()])
    term_sums, token_sums = rest[:len(term_sums)], rest[len(term_sums):]
    kept = max(global_kept, 1)
    stats = dict(loss=loss, reward_accuracy=correct / kept, margin=margin / kept, kept=int(global_kept), tokens=tokens)
    if len(options.terms) > 1:
        stats.update({f"loss/{name}": value for name, value in zip(options.terms, term_sums)})
    if token_sums[1] > 0:
        stats.update(token_metrics(token_sums))
    if aux_coef:
        stats["aux_loss"] = aux_sum / procs.data_world
    stats.update(micro_losses=micro_losses, nonfinite_pairs=nonfinite_pairs)
    return stats


# The per-pair outputs a non-finite step's diagnosis keeps.
PAIR_FIELDS = ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "kept")


def adamw_implementation(params, device: torch.device) -> dict:
    """AdamW's implementation keywords. On the CPU, plain parameters take the fused kernel: PyTorch's
    default there is a loop over the tensors, 52 ms of a 0.58 s step of a tiny Llama against 8 ms fused
    (what Hugging Face's Trainer uses, and so SafeDPOTrainer). Sharded (DTensor) parameters keep the
    default, except that foreach kernels take a list of DTensors or of plain tensors, not both (tensor
    parallelism alone has both)."""
    from torch.distributed.tensor import DTensor

    sharded = [isinstance(p, DTensor) for p in params]
    if any(sharded):
        return dict(foreach=False) if not all(sharded) else {}
    if device.type == "cpu" and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64) for p in params):
        return dict(fused=True)
    return {}


class Run:
    """One training run, set up from its config: processes, output directory, data, policy, reference,
    optimizer and schedule, restored from a checkpoint when resuming. ``step()`` takes one optimizer step;
    ``finish()`` evaluates, saves and returns the last metrics."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        quiet_libraries()
        self.cfg = cfg
        run, optim = cfg.run, cfg.optim
        self.procs = procs = Dist(run.device, cfg.parallel.tensor_parallel)
        self.out_dir = Path(run.output_dir)
        self.run_config = dict(cfg.flat(), world_size=procs.world)
        if procs.main:
            prepare_output_dir(self.out_dir, run.overwrite_output_dir, run.resume)
        procs.barrier()
        ckpt = resume_point(run.resume, self.out_dir)
        if ckpt is None and procs.main:
            refuse_another_run(self.out_dir, run.resume)
        if ckpt is not None:
            self._check_resume(ckpt)
        if procs.main:
            with writing("the run's configuration", self.out_dir / "config.yaml"):
                cfg.save(self.out_dir / "config.yaml")
        procs.barrier()
        seed_everything(optim.seed)

        self.tok = config_tokenizer(cfg.model)
        self.train_set, report = load_examples(cfg.data, self.tok, data_sources(cfg.data, "train"), optim.seed)
        self._check_data(report)
        eval_sources = data_sources(cfg.data, "eval")
        self.eval_set = load_examples(cfg.data, self.tok, eval_sources, optim.seed)[0] if eval_sources else []
        available_backends(procs.device)  # builds / loads the native kernels now, not inside the first step
        self.policy, self.packed, self.aux_coef = self._policy()
        self.reference = self._reference()
        self.options = cfg.loss_options()
        parallel = cfg.parallel
        self.wrapped = wrap_distributed(self.policy, parallel.fsdp, procs)
        if run.compile:
            # The whole forward and loss: the decoder (with graph breaks where transformers' code has them)
            # and the kernels, which are torch.library ops with fake implementations (no break of their own).
            self.wrapped = torch.compile(self.wrapped, backend=run.compile_backend)
        self.step_context = compile_context(self.policy.model) if run.compile else contextlib.nullcontext()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay,
                                           **adamw_implementation(params, procs.device))
        self.scheduler = cosine_schedule(self.optimizer, optim.warmup_steps, optim.max_steps)
        self.sharded = (parallel.fsdp or parallel.tensor_parallel > 1) and procs.world > 1
        # Sharded parameters (FSDP, tensor parallel): every rank takes part in an evaluation's forwards.
        self.evaluator = procs.main or self.sharded

        self.step_count, self.position = 0, 0
        # nonfinite: skip's counts (kept in checkpoints, so that a resume continues them exactly)
        self.counters = dict(skipped_steps=0, consecutive_skips=0)
        self.diagnosed = False  # the first non-finite step of this process is described in a file
        self.batch_pairs: list = []  # this step's global batch: pair indices per micro-batch
        self.saved_at = None  # the step of the newest checkpoint of this run, once there is one
        if ckpt is not None:
            self._restore(ckpt)
        self.stream = batch_stream([len(e) for e in self.train_set], optim.batch_size * procs.data_world, optim.seed,
                                   start=self.position)
        self.log = MetricsLog(self.out_dir, procs.main, run.tensorboard)
        if ckpt is None:
            self.log.write(dict(event="start", config=json.loads(config_json(cfg)), **report))
        else:
            self.log.write(dict(event="resume", step=self.step_count, checkpoint=str(ckpt)))
        self.end = min(optim.max_steps, optim.stop_at_step) if optim.stop_at_step > 0 else optim.max_steps
        self.bar = Progress(optim.max_steps, cfg.data.mode, initial=self.step_count,
                            disable=not (procs.main and run.progress))
        self.last: dict = {}

    def _check_data(self, report: dict) -> None:
        """Say how many rows skip_bad_rows skipped; refuse (before any model work) too few pairs for one
        global batch."""
        procs = self.procs
        if report["skipped_rows"] and procs.main:
            print(f"safedpo: skipped {report['skipped_rows']} malformed row(s) of "
                  f"{report['rows'] + report['skipped_rows']} (skip_bad_rows)", file=sys.stderr)
        need = self.cfg.optim.batch_size * procs.data_world
        if len(self.train_set) < need:
            why = (f"all {report['skipped_rows']} rows were malformed and skipped" if report["rows"] == 0 else
                   f"{report['rows']} rows gave {report['pairs']} pairs for mode {self.cfg.data.mode}")
            raise ValueError(f"too little training data: {why}, fewer than one global batch of {need} pairs "
                             "(batch_size x processes)")

    def _policy(self) -> tuple:
        """(PairScorer, packed batches?, router loss coefficient): the model (with LoRA adapters when asked),
        packed batches with flash-attention unless padding_free says otherwise, and a mixture-of-experts
        router's load-balancing loss at the config's coefficient (default: the model config's)."""
        section, loss = self.cfg.model, self.cfg.loss
        model = build_model(section, len(self.tok), self.procs.device, seed=self.cfg.optim.seed)
        check_token_ids(model, f"the tokenizer {section.name()}", training=self.train_set, evaluation=self.eval_set)
        if section.lora:
            model = apply_lora(model, section.lora)
        packed = section.padding_free
        if packed is None:
            packed = model.config._attn_implementation == "flash_attention_2"
        router = router_config(model)
        if router is None and section.router_aux_loss_coef:
            raise ValueError(f"router_aux_loss_coef is {section.router_aux_loss_coef} but {type(model).__name__} "
                             "is not a mixture-of-experts model that returns its router logits: there is no "
                             "load-balancing loss to weight; leave it unset or 0")
        aux_coef = 0.0
        if router is not None:
            aux_coef = router["coef"] if section.router_aux_loss_coef is None else section.router_aux_loss_coef
        # Compiled: the kernels' value checks would break the graph every step; the token ids were checked above.
        # Token statistics for the logged entropy, mean logits and token accuracy, from the loss's own pass.
        policy = PairScorer(model, loss.loss_input, loss.average_logps, loss.backend, router_aux=aux_coef > 0,
                            validate=not self.cfg.run.compile, token_stats=True)
        return policy, packed, aux_coef

    def _reference(self) -> ReferenceLogps:
        """The reference log-probs: reference_model when set (built as the policy's model section says),
        else the initial policy; precomputed into run's cache_dir unless reference: live."""
        cfg, procs = self.cfg, self.procs
        model = None
        if cfg.loss.reference_model:
            model = build_model(cfg.model, len(self.tok), procs.device, path=cfg.loss.reference_model)
        precompute = Precompute(cfg.run.cache(), cfg.optim.batch_size, cfg.run.progress)
        sets = {"train": self.train_set, "eval": self.eval_set}
        return ReferenceLogps(cfg.loss, self.policy, sets, self.tok, procs, self.packed, precompute, model)

    def _check_resume(self, ckpt: Path) -> None:
        """Refuse a checkpoint written under another training configuration (naming the keys), unless
        resume_check is off: then say what changed and go on."""
        saved = saved_config(ckpt)
        if saved is None:
            if self.procs.main:
                print(f"safedpo: warning: {ckpt} keeps no configuration to compare with this run's", file=sys.stderr)
            return
        changes = config_changes(normalized(saved), self.run_config)
        if not changes:
            return
        listed = "; ".join(changes)
        if self.cfg.run.resume_check:
            raise ValueError(f"resume: {ckpt} was trained under another configuration ({listed}); restore those "
                             "values, start afresh (overwrite_output_dir: true or another output_dir), or set "
                             "resume_check: false to continue anyway")
        if self.procs.main:
            print(f"safedpo: warning: resuming {ckpt} under a changed configuration ({listed})", file=sys.stderr)

    def _restore(self, ckpt) -> None:
        if self.sharded:
            self.step_count, self.position = load_sharded_checkpoint(ckpt, self._state(), self.procs.rank,
                                                                     self.procs.world)
        else:
            self.step_count, self.position = load_checkpoint(ckpt, self._state())
        self.counters.update(saved_counters(ckpt))
        self.saved_at = self.step_count
        if self.procs.main:
            truncate_metrics(self.out_dir / "metrics.jsonl", self.step_count)
            print(f"safedpo: resumed from {ckpt} at step {self.step_count}", file=sys.stderr, flush=True)

    def save(self) -> None:
        """A checkpoint of this step: FSDP shards from every rank, or the whole state from the main process.
        Every rank calls it. Non-finite weights (on any rank) are never saved: NonFiniteError instead, so
        that save_total_limit's rotation never removes the newest finite checkpoint."""
        procs, keep = self.procs, self.cfg.run.save_total_limit
        if procs.max([float(not weights_finite(self.policy.model))])[0]:
            raise NonFiniteError(f"step {self.step_count}: the model's weights are non-finite; nothing was saved. "
                                 f"{self._last_good()}")
        at = Position(self.step_count, self.position, self.run_config, self.counters)
        if self.sharded:
            save_sharded_checkpoint(self.out_dir, self._state(), at, procs, keep)
        elif procs.main:
            save_checkpoint(self.out_dir, self._state(), at, keep)
        self.saved_at = self.step_count

    def _state(self) -> TrainState:
        """What a checkpoint holds: sharded, the policy module whose parameters are the shards; else the model."""
        return TrainState(self.policy if self.sharded else self.policy.model, self.optimizer, self.scheduler)

    def _last_good(self) -> str:
        """Where the run can continue from, for the message of a stopped run."""
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            return "No checkpoint was written yet (save_every), so a rerun starts afresh (overwrite_output_dir: true)."
        return f"The last good checkpoint is {ckpt} (resume: auto continues from it)."

    def evaluate(self) -> dict:
        return evaluate_pairs(self.policy, self.reference, self.eval_set, self.options, self.cfg.optim.batch_size,
                              self.tok.pad_token_id, self.packed, self.procs.device)

    def _micro_batches(self) -> list:
        micro, self.batch_pairs = [], []
        for _ in range(self.cfg.optim.grad_accum):
            position, indices = next(self.stream)
            self.position = position + 1  # the stream position after this batch
            self.batch_pairs.append([int(i) for i in indices])
            indices = rank_slice(indices, self.procs.data_rank, self.procs.data_world)
            micro.append(make_batch(self.train_set, indices, self.tok.pad_token_id, self.packed, self.procs.device))
        return micro

    def step(self) -> None:
        """One optimizer step over a global batch; then its metrics, evaluation and checkpoint as configured.
        A non-finite loss or gradient on any rank applies no update (see guards.py): nonfinite: error stops
        the run here (NonFiniteError), nonfinite: skip counts the step as taken without changing the weights."""
        run, procs = self.cfg.run, self.procs
        start = time.perf_counter()
        with self.step_context:
            stats = train_step(self.wrapped, self.reference, self._micro_batches(), self.options, procs, self.aux_coef)
        micro_losses, nonfinite_pairs = stats.pop("micro_losses"), stats.pop("nonfinite_pairs")
        params = list(self.policy.parameters())
        clip = clip_grad_norm if self.cfg.parallel.tensor_parallel > 1 else torch.nn.utils.clip_grad_norm_
        max_norm = self.cfg.optim.clip_grad_norm
        # The clipping's total norm (the whole model's, on every layout) is the gradients' finiteness check;
        # without clipping, one pass over this rank's gradients. (Clipping by a non-finite norm spoils the
        # gradients, which a non-finite step drops anyway.)
        grad_norm = clip(params, max_norm) if max_norm > 0 else None
        grads_ok = math.isfinite(float(grad_norm)) if grad_norm is not None else grads_finite(params)
        # one all-reduce: the gradients' flag and each micro-batch's, so that every rank takes the same branch
        flags = procs.max([float(not grads_ok)] + [float(not math.isfinite(v)) for v in micro_losses])
        bad_micro = [i for i, f in enumerate(flags[1:]) if f]
        nonfinite = "loss" if bad_micro else "gradients" if flags[0] else None
        if nonfinite is None:
            self.optimizer.step()
            self.counters["consecutive_skips"] = 0
        else:
            self._nonfinite(nonfinite, bad_micro, micro_losses, nonfinite_pairs)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1

        tokens = stats.pop("tokens")  # per second of this step's own work: no set-up, evaluation or saving
        self.last = dict(step=self.step_count, **stats, lr=self.scheduler.get_last_lr()[0],
                         grad_norm=float(grad_norm) if grad_norm is not None else None,
                         tokens_per_s=tokens / max(time.perf_counter() - start, 1e-9))
        if nonfinite is not None:
            self.last.update(skipped=True, nonfinite=nonfinite, skipped_steps=self.counters["skipped_steps"])
        if run.eval_every and self.step_count % run.eval_every == 0 and self.eval_set and self.evaluator:
            self.last.update(self.evaluate())
        if procs.main:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", acc=f"{self.last['reward_accuracy']:.2f}",
                                 tok_s=f"{self.last['tokens_per_s']:.0f}")
            if self.step_count % run.log_every == 0 or self.step_count == self.end:
                self.log.write(self.last, self.step_count)
        if run.save_every and self.step_count % run.save_every == 0 and self.step_count < self.end:
            self.save()
        procs.barrier()

    def _nonfinite(self, what: str, bad_micro: list, micro_losses: list, nonfinite_pairs: list) -> None:
        """A non-finite step (``what``: "loss" or "gradients"; the micro-batches whose loss was non-finite on
        some rank): described in a file the first time, then NonFiniteError, or with nonfinite: skip counted
        (and NonFiniteError after max_nonfinite_steps in a row). The gradients are dropped by the caller."""
        run, procs = self.cfg.run, self.procs
        step = self.step_count + 1
        n = len(micro_losses)
        where = (f"the loss of micro-batch {', '.join(str(i + 1) for i in bad_micro)} of {n} is not finite" if what == "loss"
                 else f"the gradients are not finite (the loss of each of the {n} micro-batches was)")
        described = ""
        if procs.main and not self.diagnosed:
            self.diagnosed = True
            path = self.out_dir / f"nonfinite-step-{step}.json"
            record = dict(step=step, nonfinite=what, micro_batches=[i + 1 for i in bad_micro], world=procs.world,
                          pairs=self.batch_pairs, micro_losses=micro_losses, nonfinite_pairs=nonfinite_pairs,
                          lr=self.scheduler.get_last_lr()[0])
            with writing("the non-finite step's description", path):
                path.write_text(json.dumps(finite_or_none(record), allow_nan=False, indent=1) + "\n")
            described = f" {path} lists its pairs (indices into the training data, per micro-batch) and losses."
        self.log.write(dict(event="nonfinite", step=step, nonfinite=what, micro_batches=[i + 1 for i in bad_micro],
                            action=run.nonfinite))
        if run.nonfinite == "error":
            raise NonFiniteError(f"step {step}: {where}. The update was not applied and nothing was saved. "
                                 f"{self._last_good()} Lower lr, keep clip_grad_norm on, or set nonfinite: skip to skip "
                                 f"such steps.{described}")
        self.counters["skipped_steps"] += 1
        self.counters["consecutive_skips"] += 1
        if procs.main:
            print(f"safedpo: step {step}: skipped ({where})", file=sys.stderr, flush=True)
        if self.counters["consecutive_skips"] >= run.max_nonfinite_steps:
            raise NonFiniteError(f"steps {step - self.counters['consecutive_skips'] + 1}-{step}: "
                                 f"{self.counters['consecutive_skips']} non-finite steps in a row "
                                 f"(max_nonfinite_steps: {run.max_nonfinite_steps}); the weights are those of step "
                                 f"{step - self.counters['consecutive_skips']}. {self._last_good()}")

    def stop_if_asked(self, signum) -> None:
        """Interrupted (after writing a checkpoint of this step, unless one exists) when a stop signal
        reached any rank: the ranks agree through one all-reduce, so all stop after the same step."""
        asked = int(self.procs.max([float(signum or 0)])[0]) if self.procs.world > 1 else int(signum or 0)
        if not asked:
            return
        if self.saved_at != self.step_count:  # known alike on every rank (no file-system look-up)
            self.save()
        ckpt = self.out_dir / "checkpoints" / f"step-{self.step_count}"
        self.log.write(dict(event="interrupted", step=self.step_count, signal=signal.Signals(asked).name,
                            checkpoint=str(ckpt)))
        raise Interrupted(f"stopped by {signal.Signals(asked).name} after step {self.step_count} of {self.cfg.optim.max_steps}; "
                          f"checkpoint {ckpt} is written: the same command (resume: auto) continues the run",
                          asked, self.step_count, str(ckpt))

    def close(self) -> None:
        """Ends the run's output and its process group. The models, optimizer and wrappers go first,
        with the reference cycles FSDP2's modules form, while the group is still registered: none of
        them may be the group's last holder (see Dist.close). The run cannot step afterwards."""
        self.bar.close()
        self.log.close()
        for name in ("wrapped", "policy", "reference", "optimizer", "scheduler", "evaluator", "step_context"):
            self.__dict__.pop(name, None)
        gc.collect()
        self.procs.close()

    def finish(self) -> dict:
        """A last evaluation (unless the last step had one), the final checkpoint and model (with LoRA: the
        adapters, or with merge_lora the model with them merged in), and the last metrics."""
        run, procs = self.cfg.run, self.procs
        self.bar.close()
        evaluated = run.eval_every and self.step_count % run.eval_every == 0
        if self.eval_set and self.evaluator and not evaluated:
            self.last.update(self.evaluate())
            self.log.write(dict(event="eval", **self.last))
        self.save()
        final = self.out_dir / "final"
        state = full_model_state(self.policy.model) if self.sharded else None  # a collective
        if procs.main:
            model = self.policy.model.merge_and_unload() if self.cfg.model.merge_lora and not self.sharded else self.policy.model
            with writing("the final model", final, f"the checkpoint of step {self.step_count} is complete"):
                model.save_pretrained(final, **({} if state is None else dict(state_dict=state)))
                self.tok.save_pretrained(final)
        self.log.close()
        procs.barrier()
        return dict(self.last, output_dir=str(self.out_dir))


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; returns the last logged metrics (rank 0) and the output directory.

    NonFiniteError: stopped on a non-finite loss, gradient or weight (nothing non-finite is saved).
    Interrupted: stopped by SIGTERM / SIGINT after checkpointing (the same call, resume: auto, continues)."""
    with StopSignals() as signals:
        run = Run(cfg)
        try:
            run.policy.train()
            while run.step_count < run.end:
                run.stop_if_asked(signals.signum)
                run.step()
            run.stop_if_asked(signals.signum)
            return run.finish()
        finally:
            run.close()
