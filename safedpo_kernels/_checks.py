"""Argument checks shared by every entry point.

All validation happens here, once, in Python, so that every backend sees the same, already checked
inputs and raises the same errors, each naming the argument. Kernels still guard every memory access on their own,
so that a caller who passes ``validate=False`` gets wrong numbers (NaN) at worst, never an
out-of-bounds access.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._layout import Layout

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LABEL_DTYPES = (torch.int32, torch.int64)


def flat_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels as every backend reads them: (rows,) int64 and contiguous.

    The kernels index labels[r] directly, and a strided view such as labels[:, ::2] can flatten to a
    strided 1-D *view*; int32 labels are widened once (O(tokens)) so that each kernel exists for one
    label type (int32 ones cost the Triton backward 55 registers instead of 32 on sm_80).
    """
    return labels.reshape(-1).to(torch.int64).contiguous()


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when each token row is contiguous along V (all the kernels need), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _name_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_same_device(device: torch.device, ref_name: str, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {device}: move them to the same device")


def check_range(**kwargs) -> None:
    """Finite scalar hyper-parameters: ``name=(value, low, low_inclusive, high)``; inf, NaN, a bool or
    anything that is not a real number is a ValueError naming the parameter."""
    for name, (value, low, inclusive, high) in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a real number, got {value!r}")
        v = float(value)
        ok = (v >= low if inclusive else v > low) and v <= high and math.isfinite(v)
        if not ok:
            span = f"{'[' if inclusive else '('}{low}, {high}{')' if math.isinf(high) else ']'}"
            raise ValueError(f"{name} must be a finite number in {span}, got {value}")


def check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int, padded: bool) -> None:
    """ValueError naming how many labels are outside [0, V) (and not ignore_index) and the first one."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    count = int(bad.sum())
    if count:
        first = bad.reshape(-1).nonzero()[0, 0].item()
        where = f"(row {first // labels.shape[-1]}, position {first % labels.shape[-1]})" if padded else f"position {first}"
        value = labels.reshape(-1)[first].item()
        raise ValueError(
            f"labels: {count} value(s) outside [0, {vocab}) that are not ignore_index={ignore_index}; "
            f"the first is {value} at {where}"
        )


def check_cu_seqlens(cu_seqlens, total: int, device=None, values: bool = True) -> torch.Tensor:
    """cu_seqlens as int64 on ``device`` after checking it: 1-D of N + 1 >= 2 integers (a tensor, or a
    list / tuple of ints), starting at 0, non-decreasing, ending at ``total``. ``values=False`` checks its
    shape and dtype only: the values need a host synchronization (validate=False skips it)."""
    if isinstance(cu_seqlens, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in cu_seqlens):
            raise TypeError("cu_seqlens given as a list must hold ints")
        cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.int64, device=device)
    _name_tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.dtype not in LABEL_DTYPES:
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if device is not None and cu_seqlens.device != torch.device(device):
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the tokens are on {device}: move them to the same device")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D of length N + 1 >= 2, got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.to(torch.int64)
    if not values:
        return cu
    # One host sync for all three checks; cu_seqlens is tiny.
    first, last, decreasing = torch.stack([cu[0], cu[-1], (cu[1:] < cu[:-1]).sum()]).tolist()
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if decreasing:
        raise ValueError("cu_seqlens must be non-decreasing (cumulative sequence lengths)")
    if last != total:
        raise ValueError(f"cu_seqlens must end at total_tokens={total}, got {last}")
    return cu


def check_logits_and_labels(
    logits,
    labels,
    cu_seqlens,
    ignore_index: int,
    validate: bool,
    *,
    logits_name: str = "logits",
) -> Layout:
    """Validate (logits|hidden, labels, cu_seqlens) and describe their layout: shapes, dtypes, devices and
    (reading values, with ``validate``) cu_seqlens; the labels' range is the caller's next check
    (``check_labels_in_range``), once the vocabulary size over every rank is known.

    ``logits_name`` lets the fused-linear entry points reuse this for ``hidden`` (N, T, H) / (total, H).
    """
    _name_tensor(logits, logits_name)
    _name_tensor(labels, "labels")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{logits_name} must be float32, bfloat16 or float16, got {logits.dtype}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int32 or int64 token ids, got {labels.dtype}")
    check_same_device(logits.device, logits_name, labels=labels,
                      cu_seqlens=cu_seqlens if isinstance(cu_seqlens, torch.Tensor) else None)
    if logits.dim() >= 1 and logits.shape[-1] == 0:
        raise ValueError(f"{logits_name} has an empty last dimension")
    if cu_seqlens is None:
        if logits.dim() != 3:
            raise ValueError(
                f"{logits_name} must be (N, T, {'V' if logits_name == 'logits' else 'H'}) for the padded layout, got "
                f"shape {tuple(logits.shape)}; for the packed layout pass cu_seqlens"
            )
        if tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"labels must have shape {tuple(logits.shape[:2])} to match {logits_name} "
                f"{tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        N, T = logits.shape[:2]
        layout = Layout(n_seq=N, rows=N * T, seq_len=T, padded=True, cu_seqlens=None)
    else:
        if logits.dim() != 2:
            raise ValueError(
                f"with cu_seqlens, {logits_name} must be packed (total_tokens, "
                f"{'V' if logits_name == 'logits' else 'H'}), got shape {tuple(logits.shape)}"
            )
        total = logits.shape[0]
        if tuple(labels.shape) != (total,):
            raise ValueError(f"labels must have shape ({total},) to match packed {logits_name}, got {tuple(labels.shape)}")
        cu = check_cu_seqlens(cu_seqlens, total, logits.device, values=validate)
        layout = Layout.packed(cu, total)
    return layout


def check_pair_inputs(n_seq: int, device: torch.device, ref_logps, chosen_safe, rejected_safe,
                      rows_name: str = "the logits", validate: bool = True) -> int:
    """Validate the loss-only inputs (ref_logps may be None: reference-free); returns B (the pairs).
    ``validate=False`` skips the one check that reads values (0/1 integer flags: a host synchronization)."""
    if n_seq % 2:
        raise ValueError(
            f"a preference loss needs N = 2B rows (chosen rows then rejected rows), got an odd N = {n_seq} in {rows_name}"
        )
    B = n_seq // 2
    if ref_logps is not None:
        _name_tensor(ref_logps, "ref_logps")
        if not ref_logps.is_floating_point():
            raise TypeError(f"ref_logps must be a floating-point tensor, got {ref_logps.dtype}")
        if tuple(ref_logps.shape) != (n_seq,):
            raise ValueError(f"ref_logps must have shape ({n_seq},) = (2B,), got {tuple(ref_logps.shape)}")
    for name, flag in (("chosen_safe", chosen_safe), ("rejected_safe", rejected_safe)):
        _name_tensor(flag, name)
        if flag.is_floating_point() or flag.is_complex():
            raise TypeError(f"{name} must be a bool or 0/1 integer tensor, got {flag.dtype}")
        if tuple(flag.shape) != (B,):
            raise ValueError(f"{name} must have shape ({B},) = (B,), got {tuple(flag.shape)}")
        if validate and flag.dtype != torch.bool and bool(((flag != 0) & (flag != 1)).any()):
            raise ValueError(f"{name} must hold only 0/1 (or True/False) values")
    check_same_device(device, rows_name, ref_logps=ref_logps, chosen_safe=chosen_safe, rejected_safe=rejected_safe)
    return B


def check_token_counts(token_counts, n_seq: int, device) -> None:
    """token_counts: a (2B,) integer tensor on the rows' device."""
    _name_tensor(token_counts, "token_counts")
    if token_counts.is_floating_point() or token_counts.is_complex() or token_counts.dtype == torch.bool:
        raise TypeError(f"token_counts must be an integer tensor, got {token_counts.dtype}")
    if tuple(token_counts.shape) != (n_seq,):
        raise ValueError(f"token_counts must have shape ({n_seq},) = (2B,), got {tuple(token_counts.shape)}")
    check_same_device(device, "policy_logps", token_counts=token_counts)


def check_denominators(denominators, options, device):
    """``denominators=(pairs, tokens)`` of reduction "mean": numbers or 0-dim tensors, finite and >= 0;
    None stays None. Returns them as a (2,) float64 tensor on ``device``."""
    if denominators is None:
        return None
    if options.reduction != "mean":
        raise ValueError("denominators are the divisors of reduction='mean'; reduction='sum' divides by nothing")
    if isinstance(denominators, (str, bytes)) or not hasattr(denominators, "__len__") or len(denominators) != 2:
        raise ValueError(f"denominators must be (pairs, tokens): two numbers or 0-dim tensors, got {denominators!r}")
    values = []
    for name, d in zip(("pairs", "tokens"), denominators):
        if isinstance(d, torch.Tensor):
            if d.dim() != 0 or d.is_complex() or d.dtype == torch.bool:
                raise ValueError(f"denominators' {name} must be a number or a 0-dim real tensor, got {d!r}")
            values.append(d.detach().to(device=device, dtype=torch.float64))
        else:
            if isinstance(d, bool) or not isinstance(d, numbers.Real) or not math.isfinite(d) or d < 0:
                raise ValueError(f"denominators' {name} must be a finite number >= 0, got {d!r}")
            values.append(torch.tensor(float(d), dtype=torch.float64, device=device))
    return torch.stack(values)


def check_logit_transform(logit_scale: float, softcap) -> None:
    """logit_scale > 0 and, when set, softcap > 0, both finite: ValueError naming the bad one."""
    inf = float("inf")
    check_range(logit_scale=(logit_scale, 0.0, False, inf))
    if softcap is not None:
        check_range(softcap=(softcap, 0.0, False, inf))


def check_linear_weight(hidden: torch.Tensor, weight, bias) -> int:
    """Validate the LM head (V, H) weight and optional (V,) bias against hidden; returns V."""
    _name_tensor(weight, "weight")
    if weight.dtype not in LOGIT_DTYPES:
        raise TypeError(f"weight must be float32, bfloat16 or float16, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the 2-D (V, H) LM head weight, got shape {tuple(weight.shape)}")
    V, H = weight.shape
    if V == 0:
        raise ValueError("weight has V = 0 rows (an empty vocabulary)")
    if hidden.dim() >= 1 and hidden.shape[-1] != H:
        raise ValueError(f"weight is (V, H) = {tuple(weight.shape)} but hidden's last dimension is H = {hidden.shape[-1]}")
    if bias is not None:
        _name_tensor(bias, "bias")
        if bias.dtype not in LOGIT_DTYPES:
            raise TypeError(f"bias must be float32, bfloat16 or float16, got {bias.dtype}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape ({V},) to match weight {tuple(weight.shape)}, got {tuple(bias.shape)}")
    check_same_device(hidden.device, "hidden", weight=weight, bias=bias)
    return V
