"""Labels aligned with the full logits, from the input ids and a completion mask.

The kernels read ``labels[t]`` as the token that ``logits[t]`` predicts: the caller shifts. Passing the
input ids themselves (unshifted) gives plausible, wrong log-probs, so this is the way to build labels
from what preference trainers carry (input_ids and a mask of the completion tokens, as TRL's collator
returns them).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_cu_seqlens


def labels_from_completion_mask(
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """labels[t] = input_ids[t + 1] where completion_mask[t + 1] is true, else ``ignore_index``; the last
    position of every sequence (of every packed segment too) is ``ignore_index``.

    Args:
        input_ids: (N, T) padded (left or right padding) or (total,) packed with ``cu_seqlens``; integers.
        completion_mask: the same shape; bool or 0/1 integers, true on the completion (response) tokens.
        cu_seqlens: int32/int64 (N + 1,) cumulative sequence lengths of the packed layout.
        ignore_index: the label of positions that do not count.

    Returns:
        int64 labels of input_ids' shape, aligned with the logits of the same positions.
    """
    for name, t in (("input_ids", input_ids), ("completion_mask", completion_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"{name} must hold integers{' or booleans' if name == 'completion_mask' else ''}, got {t.dtype}")
    if completion_mask.shape != input_ids.shape:
        raise ValueError(f"completion_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(completion_mask.shape)}")
    if completion_mask.device != input_ids.device:
        raise ValueError(f"completion_mask is on {completion_mask.device} but input_ids is on {input_ids.device}")
    if cu_seqlens is None and input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (N, T) for the padded layout, got shape {tuple(input_ids.shape)}; "
                         "for the packed layout pass cu_seqlens")
    if cu_seqlens is not None and input_ids.dim() != 1:
        raise ValueError(f"with cu_seqlens, input_ids must be packed (total,), got shape {tuple(input_ids.shape)}")
    mask = completion_mask.bool()
    labels = torch.full(input_ids.shape, ignore_index, dtype=torch.int64, device=input_ids.device)
    # Position t predicts token t + 1: shift the ids and the mask left by one along the sequence.
    labels[..., :-1] = torch.where(mask[..., 1:], input_ids[..., 1:].long(), ignore_index)
    if cu_seqlens is not None:
        cu = check_cu_seqlens(cu_seqlens, input_ids.shape[0], device=input_ids.device)
        ends = cu[1:][cu[1:] > cu[:-1]] - 1  # the last token of every non-empty segment predicts nothing
        labels[ends] = ignore_index
    return labels
