"""SafeDPO inside TRL: ``SafeDPOConfig`` and ``SafeDPOTrainer`` on top of TRL's DPOConfig / DPOTrainer.

    pip install 'safedpo-kernels[trl]'      # TRL >= 1.16, < 2

    from safedpo_kernels.integrations.trl import SafeDPOConfig, SafeDPOTrainer, pku_to_preference

    dataset = pku_to_preference(load_dataset("PKU-Alignment/PKU-SafeRLHF-30K", split="train"))
    args = SafeDPOConfig(output_dir="runs/safedpo", beta=0.1, delta=10.0, precompute_ref_log_probs=True)
    SafeDPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=args, train_dataset=dataset).train()

What it adds to TRL's trainer: the safety flags (``chosen_safe``, ``rejected_safe`` columns, True = safe)
travel through TRL's dataset preparation and collator to the loss; the loss is SafeDPO (the safety
transformation T and the margin delta) or another loss of the family (``loss_type`` sigmoid, robust,
hinge, ipo, sft, or TRL's list of them mixed by ``loss_weights``, e.g. ``["sigmoid", "sft"]`` for
RPO-style regularisation), computed by this package's fused kernels -- from the logits with an in-place backward
(``fused_loss_input="logits"``), or from the last hidden states and the LM head without any logits
(``"linear"``, which forms its gradients in the forward); reference log-probs precomputed by TRL
(``precompute_ref_log_probs``) or computed by the same kernels from the reference model (or the policy
with its adapters disabled, or TRL's frozen "ref" copy of a pretrained adapter); a mixture-of-experts
model's router loss, as TRL adds it; DPOTrainer's token metrics (entropy, logits/chosen,
logits/rejected, mean_token_accuracy) from the kernels' own pass; ``padding_free=True`` (each batch packed into one row, its
sequences told apart by position ids and cu_seqlens: flash-attention's varlen path, or transformers'
packed SDPA); and SafeDPO's metrics: kept and swapped pairs, each term of a loss list. With
``delta=0.0, swap=False, drop_both_unsafe=False`` it trains exactly TRL's DPO (with ``label_smoothing``
at 0 for "sigmoid": TRL 1.16 ignores it there, SafeDPO's "sigmoid" is conservative DPO with it).
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

try:
    from accelerate.utils import is_peft_model
    from trl import DPOConfig, DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import use_adapter
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("safedpo_kernels.integrations.trl needs TRL: pip install 'safedpo-kernels[trl]'") from exc

from ..dispatch import BACKENDS
from ..labels import labels_from_completion_mask
from ..loss import SafeDPOOutput
from ..options import TERMS, LossOptions
from .hf import CausalLMLoss, PairInputs, compile_context, token_metric_sums, token_metrics
from .rows import preference_pair, safety_flag

SAFETY_COLUMNS = ("chosen_safe", "rejected_safe")
# Batch columns that are not the model's inputs (as TRL's DPOTrainer has them, plus the safety flags).
NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps", *SAFETY_COLUMNS)


@dataclass
class SafeDPOConfig(DPOConfig):
    """DPOConfig plus SafeDPO's settings. ``loss_type`` takes sigmoid (SafeDPO), robust, hinge, ipo or sft, or
    a list of them weighted by ``loss_weights`` (each term averaged over this batch's kept pairs, "sft"
    over their preferred responses' tokens, as TRL averages each micro-batch)."""

    delta: float = field(default=10.0, metadata={"help": "SafeDPO's safety margin (not multiplied by beta); >= 0."})
    swap: bool = field(default=True, metadata={"help": "T: swap a pair whose preferred response is unsafe and the other safe."})
    drop_both_unsafe: bool = field(default=True, metadata={"help": "T: drop a pair whose responses are both unsafe."})
    fused_loss_input: str = field(
        default="logits",
        metadata={"help": "'logits': fused log-probs from the logits, in-place backward; 'linear': from the hidden "
                          "states and the LM head, without logits (the model's logit_scale / softcap are read)."},
    )
    ref_fused_loss_input: str = field(
        default="logits",
        metadata={"help": "the reference's log-probs (unless precomputed): 'logits', from its full logits, as "
                          "DPOTrainer's rounding has them; 'linear', from its hidden states and LM head for the "
                          "response tokens only, without the (2B, T, V) logits: the memory to take at long "
                          "sequences."},
    )
    kernel_backend: str = field(default="auto", metadata={"help": "safedpo_kernels backend: auto, triton, native, torch."})

    def loss_options(self) -> LossOptions:
        """The SafeDPO loss these arguments train (checked: a ValueError names a bad value). TRL's "ipo"
        uses token-averaged log-ratios, so it takes average=True; TRL averages inside its "ipo" branch
        only, so a list mixing "ipo" with another term could not equal TRL's loss and is refused."""
        names = list(self.loss_type) if isinstance(self.loss_type, (list, tuple)) else [self.loss_type]
        unknown = [n for n in names if n not in TERMS]
        if unknown:
            raise ValueError(f"SafeDPOTrainer supports loss_type names {TERMS}, got {unknown} in {self.loss_type!r}")
        if "ipo" in names and len(names) > 1:
            raise ValueError(f"loss_type {names}: TRL computes 'ipo' on token-averaged log-ratios and every other term "
                             "on summed ones, so a list mixing 'ipo' with another term has no single average that "
                             "equals TRL's loss; use 'ipo' alone")
        return LossOptions(beta=self.beta, delta=self.delta, swap=self.swap, drop_both_unsafe=self.drop_both_unsafe,
                           label_smoothing=self.label_smoothing, loss_type=names[0] if len(names) == 1 else tuple(names),
                           loss_weights=self.loss_weights, average=names == ["ipo"])


class SafetyPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator that also stacks the safety flags (bool (B,) tensors)."""

    def torch_call(self, examples: list) -> dict:
        out = super().torch_call(examples)
        for name in SAFETY_COLUMNS:
            if name not in examples[0]:
                raise KeyError(f"every example needs a {name!r} column (True = safe); see pku_to_preference")
            out[name] = torch.tensor([safety_flag(e[name], f"SafetyPreferenceCollator: column {name!r}") for e in examples],
                                     dtype=torch.bool)
        return out


def pku_to_preference(dataset):
    """PKU-SafeRLHF rows (prompt, response_0/1, is_response_0/1_safe, better_response_id) -> TRL's
    preference columns (prompt, chosen, rejected) with chosen_safe / rejected_safe; chosen is the
    helpfulness-preferred response, as SafeDPO expects (T does the rest). Flags and ids are read strictly
    (bool, 0/1, or the strings true/false, 1/0, yes/no): anything else is a ValueError naming the row."""

    def convert(row, i):
        return preference_pair(row, f"pku_to_preference: row {i + 1}")

    return dataset.map(convert, with_indices=True, remove_columns=dataset.column_names)


def check_preference_columns(dataset, name: str = "train_dataset") -> None:
    """ValueError naming the missing columns (and pku_to_preference for PKU-SafeRLHF rows) before TRL's
    dataset preparation would fail on them with a bare KeyError. Datasets without column names (a
    streaming one) and dicts of several (one per eval set) are checked where possible."""
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_preference_columns(part, f"{name}[{key!r}]")
        return
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, list):
        return
    images = [c for c in ("image", "images") if c in columns]
    if images:
        raise ValueError(f"{name}: column {images[0]!r}: SafeDPOTrainer trains on text preference data; vision-language "
                         "preference data (TRL's DataCollatorForVisionPreference) is not supported")
    missing = [c for c in ("chosen", "rejected", *SAFETY_COLUMNS) if c not in columns]
    if missing:
        hint = ("; these are PKU-SafeRLHF rows: convert them with pku_to_preference(dataset)"
                if "better_response_id" in columns else "")
        raise ValueError(f"{name}: missing column(s) {missing} (it has {columns}); SafeDPOTrainer takes TRL's "
                         f"preference columns (prompt,) chosen, rejected and the safety flags chosen_safe, "
                         f"rejected_safe (True = safe){hint}")


def _add_fused_linear_loss(model, adapter: CausalLMLoss) -> None:
    """``model(..., safedpo_linear=(labels, PairInputs))`` computes the fused-linear loss inside the model's
    forward (so that DDP/FSDP see the LM head used there) and returns the SafeDPOOutput's fields and the
    router's auxiliary loss (None without one); without it the forward is unchanged."""
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, safedpo_linear=None, **kwargs):
        if safedpo_linear is None:
            return original(*args, **kwargs)
        if args:
            raise TypeError("the fused-linear loss takes the model's inputs as keywords")
        labels, request, cu_seqlens = safedpo_linear
        out, aux = adapter(self, kwargs, labels, cu_seqlens=cu_seqlens, loss=request, forward=original)
        return (*out, aux)

    model.forward = types.MethodType(forward, model)


class SafeDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with the SafeDPO loss computed by the fused kernels (see the module docstring)."""

    def __init__(self, model, ref_model=None, args: Optional[SafeDPOConfig] = None, data_collator=None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            args = SafeDPOConfig(f"{str(name).split('/')[-1]}-SafeDPO")
        if not isinstance(args, SafeDPOConfig):
            raise TypeError(f"args must be a SafeDPOConfig, got {type(args).__name__}")
        self._check_supported(args)
        datasets = dict(zip(("train_dataset", "eval_dataset"), rest))
        datasets.update({k: kwargs[k] for k in ("train_dataset", "eval_dataset") if k in kwargs})
        for name, dataset in datasets.items():
            check_preference_columns(dataset, name)
        # TRL 1.16's DPOTrainer turns padding_free off (with a warning that it falls back to padding); here
        # its collator pads and every batch is packed before the forward, so TRL sees it off.
        self.pack = bool(args.padding_free)
        args.padding_free = False
        try:
            super().__init__(model, ref_model, args, data_collator, *rest, **kwargs)
        finally:
            args.padding_free = self.pack
        if data_collator is None and isinstance(self.data_collator, DataCollatorForPreference):
            parent = self.data_collator
            self.data_collator = SafetyPreferenceCollator(
                pad_token_id=parent.pad_token_id, max_length=parent.max_length, truncation_mode=parent.truncation_mode,
                pad_to_multiple_of=parent.pad_to_multiple_of,
            )
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.loss_adapter = CausalLMLoss(base, args.fused_loss_input, args.kernel_backend,
                                         router_aux=getattr(self, "aux_loss_enabled", False),
                                         fallback="fused_loss_input='logits'",
                                         # compiled: no value checks of ours that would break a graph
                                         validate=not args.torch_compile,
                                         token_stats=True)  # DPOTrainer's entropy, logits and token accuracy
        if args.fused_loss_input == "linear":
            _add_fused_linear_loss(base, self.loss_adapter)
        self._check_reference_path(args, getattr(self, "is_fsdp_enabled", False), getattr(self, "is_deepspeed_enabled", False))
        self._compile_context = compile_context(base) if args.torch_compile else contextlib.nullcontext()

    @staticmethod
    def _check_supported(args: SafeDPOConfig) -> None:
        options = args.loss_options()
        if args.label_smoothing and "sigmoid" in options.terms:
            # Not an error: SPEC's "sigmoid" is conservative DPO. A config carried over from DPOTrainer
            # would otherwise train another loss without a word.
            warnings.warn(f"label_smoothing={args.label_smoothing} with loss_type 'sigmoid': SafeDPOTrainer trains "
                          "conservative DPO, -(1 - eps) log sigmoid(u) - eps log sigmoid(-u); TRL 1.16's DPOTrainer "
                          "uses label_smoothing only in its 'robust', 'exo_pair' and 'aot' losses and trains plain "
                          "'sigmoid' with it. Set label_smoothing=0.0 for TRL's loss", UserWarning, stacklevel=3)
        unsupported = dict(
            ld_alpha=args.ld_alpha is not None, use_weighting=args.use_weighting,
            f_divergence_type=args.f_divergence_type != "reverse_kl",
        )
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"SafeDPOTrainer does not support {', '.join(bad)}; leave them at their defaults")
        for name in ("fused_loss_input", "ref_fused_loss_input"):
            if getattr(args, name) not in ("logits", "linear"):
                raise ValueError(f"{name} must be 'logits' or 'linear', got {getattr(args, name)!r}")
        if args.kernel_backend not in BACKENDS:
            raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {args.kernel_backend!r}")

    @staticmethod
    def _check_reference_path(args: SafeDPOConfig, fsdp: bool, deepspeed: bool) -> None:
        """ref_fused_loss_input="linear" calls the reference's decoder and head directly, past its wrapper's
        forward: under FSDP or DeepSpeed ZeRO that forward is what gathers the sharded weights first."""
        if args.ref_fused_loss_input == "linear" and (fsdp or deepspeed) and not args.precompute_ref_log_probs:
            raise ValueError(f"ref_fused_loss_input='linear' is not supported with {'FSDP' if fsdp else 'DeepSpeed'} "
                             "(the reference's sharded weights are gathered by its wrapped forward); use 'logits', "
                             "or precompute_ref_log_probs=True")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *SAFETY_COLUMNS]))

    def _model_inputs(self, inputs: dict, policy: bool = True) -> tuple:
        """(the model's keyword inputs, labels, cu_seqlens) of a batch: as TRL's DPOTrainer passes them, or
        with padding_free packed into one row (cu_seqlens None when padded). The policy's forward of a
        mixture-of-experts model also returns its router's auxiliary loss (when TRL enabled it)."""
        if self.pack:
            kwargs, labels, cu_seqlens = pack_batch(inputs)
        else:
            kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
            labels = labels_from_completion_mask(inputs["input_ids"], inputs["completion_mask"])
            cu_seqlens = None
        kwargs["use_cache"] = False
        if policy and getattr(self, "aux_loss_enabled", False):
            kwargs["output_router_logits"] = True
        return kwargs, labels, cu_seqlens

    def _reference_adapter(self):
        """Without a ref_model, a PEFT policy is its own reference: TRL's frozen "ref" copy of a pretrained
        adapter when it made one, else the policy with its adapters disabled."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    @property
    def reference_adapter(self) -> CausalLMLoss:
        """The reference's way to log-probs (ref_fused_loss_input): the fused kernels on its logits, or on
        its hidden states and LM head (the response tokens' rows only). Made on first use, which can be
        TRL's precomputation inside DPOTrainer.__init__."""
        if getattr(self, "_reference_loss", None) is None:
            model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self._reference_loss = CausalLMLoss(model, self.args.ref_fused_loss_input, self.args.kernel_backend)
        return self._reference_loss

    @torch.no_grad()
    def _ref_logps(self, model, inputs, autocast: bool) -> torch.Tensor:
        """(2B,) summed reference log-probs of a batch; ``model`` is the reference model, or the policy
        (then through its reference adapter)."""
        if self.args.ref_fused_loss_input == "linear":
            # The decoder and the head are called directly, past the wrappers of a prepared model's forward,
            # among them the mixed-precision autocast, which then comes from here (as for the policy).
            model = self.accelerator.unwrap_model(model)
            model = model.get_base_model() if hasattr(model, "get_base_model") else model
            autocast = True
        kwargs, labels, cu_seqlens = self._model_inputs(inputs, policy=False)
        with (self._reference_adapter(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              self.accelerator.autocast() if autocast else contextlib.nullcontext()):
            return self.reference_adapter(model, kwargs, labels, cu_seqlens=cu_seqlens).result

    def compute_ref_log_probs(self, model, inputs):
        """(chosen, rejected) reference log-probs of a batch for TRL's precomputation (which runs before
        the model is prepared, so under the accelerator's autocast here, as TRL does)."""
        return self._ref_logps(model, inputs, autocast=True).chunk(2, dim=0)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        args = self.args
        options = args.loss_options()
        missing = [c for c in SAFETY_COLUMNS if c not in inputs]
        if missing:
            raise KeyError(f"the batch has no {missing}: a custom data_collator must pass the safety flags on as bool "
                           "(B,) tensors, as SafetyPreferenceCollator does")
        kwargs, labels, cu_seqlens = self._model_inputs(inputs)
        if self.precompute_ref_logps:
            ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()
        else:
            if self.ref_model is None and not is_peft_model(self.model):
                raise ValueError("no reference: pass ref_model, train LoRA adapters, or set precompute_ref_log_probs=True")
            reference = self.model if self.ref_model is None else self.ref_model
            ref = self._ref_logps(reference, inputs, autocast=False).float()
        if options.average:  # TRL's reference log-probs are sums
            ref = ref / inputs["completion_mask"][:, 1:].sum(-1).clamp(min=1)
        request = PairInputs(ref, inputs["chosen_safe"], inputs["rejected_safe"], options)
        with self._compile_context:
            if args.fused_loss_input == "linear":
                *fields, aux_loss = model(**kwargs, safedpo_linear=(labels, request, cu_seqlens))
                out = SafeDPOOutput(*fields)
            else:
                out, aux_loss = self.loss_adapter(model, kwargs, labels, cu_seqlens=cu_seqlens, loss=request)
        loss = out.loss
        if getattr(self, "aux_loss_enabled", False) and aux_loss is not None:  # as TRL's DPOTrainer adds it
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        if mode == "train":
            self._refuse_nonfinite(loss, out, inputs)
        self._log_metrics(mode, out, inputs, options.terms)
        if return_outputs:
            with torch.no_grad():
                return loss, model(**self._model_inputs(inputs)[0])
        return loss

    def _refuse_nonfinite(self, loss: torch.Tensor, out: SafeDPOOutput, inputs: dict) -> None:
        """FloatingPointError, on every process alike (one all-reduce), when a training batch's loss is not
        finite on any of them, naming the step and the batch, before any gradient of it exists. The
        Trainer would otherwise apply that update (its logging_nan_inf_filter only keeps the NaN out of
        the logged loss), and every weight would be NaN from then on."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if not bad.item():
            return
        here = "" if torch.isfinite(loss.detach()) else (
            f"; this process's {out.chosen_logps.numel()} pairs have chosen log-probs {out.chosen_logps.tolist()}, "
            f"rejected {out.rejected_logps.tolist()} (after the safety transform) and completion lengths "
            f"{inputs['completion_mask'].sum(-1).tolist()} (chosen rows, then rejected)")
        raise FloatingPointError(
            f"SafeDPOTrainer: the training loss at step {self.state.global_step + 1} is not finite on {int(bad.item())} of "
            f"{self.accelerator.num_processes} processes{here}. Not training on it: lower learning_rate, keep max_grad_norm "
            "on, check the batch's data, and resume from the last checkpoint (resume_from_checkpoint)")

    def _log_metrics(self, mode: str, out: SafeDPOOutput, inputs: dict, terms: tuple) -> None:
        gather = self.accelerator.gather_for_metrics
        if mode == "train":  # DPOTrainer's running count of the attended tokens trained on
            batch_tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += batch_tokens // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        kept = out.kept
        n_kept = gather(kept.sum()).sum().clamp(min=1)
        metrics = {
            "rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "logps/chosen": out.chosen_logps, "logps/rejected": out.rejected_logps,
        }
        for name, value in metrics.items():  # over the kept pairs
            self._metrics[mode][name].append((gather((value * kept).sum()).sum() / n_kept).item())
        if out.token_stats is not None:  # as DPOTrainer aggregates them: token sums over all processes
            sums = gather(token_metric_sums(out.token_stats)[None]).sum(0)
            for name, value in token_metrics(sums).items():
                self._metrics[mode][name].append(value)
        self._metrics[mode]["safedpo/kept_pairs"].append(gather(kept.float().mean()).mean().item())
        self._metrics[mode]["safedpo/swapped_pairs"].append(gather(out.swapped.float().mean()).mean().item())
        if len(terms) > 1:  # each term's weighted share of the loss, averaged over the processes as the loss is
            for name, value in zip(terms, gather(out.loss_terms.detach()[None]).mean(0).tolist()):
                self._metrics[mode][f"loss/{name}"].append(value)


def pack_batch(inputs: dict) -> tuple:
    """A padded preference batch (TRL's collator: input_ids, attention_mask, completion_mask (2B, L)) as one
    packed row: (model inputs {input_ids, position_ids} (1, total), labels (total,), cu_seqlens (2B + 1,)
    int32). Each row keeps its attended tokens in order (left or right padding alike); positions restart
    at 0 for every sequence, which is how flash-attention's varlen path and transformers' packed SDPA
    tell the sequences apart."""
    mask = inputs["attention_mask"].bool()
    lengths = mask.sum(-1)
    ids = inputs["input_ids"][mask]  # row by row, each row's tokens in order
    completion = inputs["completion_mask"][mask]
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    positions = torch.arange(ids.shape[0], device=ids.device) - torch.repeat_interleave(cu[:-1], lengths)
    cu_seqlens = cu.to(torch.int32)
    labels = labels_from_completion_mask(ids, completion, cu_seqlens=cu_seqlens)
    return dict(input_ids=ids[None], position_ids=positions[None]), labels, cu_seqlens


__all__ = ["SafeDPOConfig", "SafeDPOTrainer", "SafetyPreferenceCollator", "pku_to_preference", "check_preference_columns",
           "pack_batch"]
