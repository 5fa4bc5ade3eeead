"""Vocabulary- and context-parallel layouts (shared/SPEC.md, "Parallel layouts"): what the ranks of a
process group exchange so that a sharded input gives the single-process result.

Vocabulary-parallel (``vocab_group`` of p ranks): rank r holds the logits' (or the LM head's) columns
[r V/p, (r + 1) V/p). Each rank computes, per token, its shard's log-sum-exp and (where the label falls in
its shard) the target logit; one MAX and one SUM all-reduce of O(tokens) floats give every rank the
global log-sum-exp and target, hence the same log-probs. The backward needs no communication for the
logits: d logits of a shard = g * (onehot - exp(z - lse)) with the global lse. The fused-linear path
all-reduces d hidden (O(tokens x H)), since every rank's head shard contributes to it.

Context-parallel (``context_group``): each rank holds a slice of the positions of every sequence; the
per-sequence partial sums (and token counts) are all-reduced (O(sequences)) before the pair loss, and
each rank's gradients are those of its own tokens.

The ops take the groups by name (torch.library ops take no ProcessGroup objects); ``group_name`` and
``resolve`` translate.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

NO_GROUP = ""


def group_name(group) -> str:
    """The name the ops take for ``group`` (a ProcessGroup, or None: no parallelism)."""
    if group is None:
        return NO_GROUP
    import torch.distributed as dist

    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"a process group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    return group.group_name


def resolve(name: str):
    """The ProcessGroup an op was given by name, or None."""
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def all_reduce(t: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """``t`` all-reduced in place over ``group``."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return t


class VocabShard(NamedTuple):
    """This rank's columns of the vocabulary: [offset, offset + width) of ``total``."""

    offset: int
    width: int
    total: int


def vocab_shard(group, width: int) -> Optional[VocabShard]:
    """This rank's shard of a vocabulary split in equal shards of ``width`` over ``group`` (or None)."""
    if group is None:
        return None
    import torch.distributed as dist

    return VocabShard(dist.get_rank(group) * width, width, dist.get_world_size(group) * width)


def local_labels(labels: torch.Tensor, shard: Optional[VocabShard], ignore_index: int) -> tuple:
    """(labels as this shard's kernels read them, in_shard): a label in the shard becomes its column
    there; a counted label elsewhere becomes an out-of-range column (its row's log-sum-exp is computed,
    nothing is gathered), an ignored one stays ignored."""
    if shard is None:
        return labels, None
    in_shard = (labels >= shard.offset) & (labels < shard.offset + shard.width) & (labels != ignore_index)
    outside = shard.width if ignore_index != shard.width else shard.width + 1
    local = torch.where(in_shard, labels - shard.offset, torch.full_like(labels, outside))
    return torch.where(labels == ignore_index, labels, local), in_shard


def combine_vocab(tok: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, in_shard: torch.Tensor, shard: VocabShard,
                  ignore_index: int, group) -> tuple:
    """The global (token log-prob, log-sum-exp), (rows,) float32 each, from this shard's: its log-sum-exp
    and, where the label is in the shard, its token log-prob (target - local lse). One MAX all-reduce of
    the rows' maxima, one SUM all-reduce of (sum of exp, target logit): 3 floats per token."""
    top = all_reduce(lse.clone(), group, "max")
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    target = torch.where(in_shard, tok + lse, torch.zeros_like(tok))
    both = all_reduce(torch.stack([torch.exp(lse - shift), target]), group)
    lse_all = shift + torch.log(both[0])
    counted = labels != ignore_index
    valid = counted & (labels >= 0) & (labels < shard.total)
    tok_all = torch.where(valid, both[1] - lse_all, torch.full_like(lse_all, float("nan")))
    return torch.where(counted, tok_all, torch.zeros_like(tok_all)), lse_all


def combine_vocab_stats(st: torch.Tensor, lse: torch.Tensor, lse_all: torch.Tensor, labels: torch.Tensor,
                        in_shard: torch.Tensor, shard: VocabShard, group) -> torch.Tensor:
    """The whole vocabulary's token statistics (rows, STATS) from this shard's (torch_chunked.STATS) and
    the shard's and the global log-sum-exps: the softmax-weighted logit sums rescaled to the global
    log-sum-exp and added up with the logit sums and the target logit (one SUM all-reduce of 3 floats per
    token), the maxima and the maxima before the label (one MAX all-reduce of 2). A shard that lies past
    the label has no column before it."""
    weighted = st[:, 0] * torch.exp(lse - lse_all)
    target = torch.where(in_shard, st[:, 4], torch.zeros_like(lse))
    sums = all_reduce(torch.stack([weighted, st[:, 1], target]), group)
    before = torch.where(labels < shard.offset, torch.full_like(lse, float("-inf")), st[:, 3])
    maxima = all_reduce(torch.stack([st[:, 2], before]), group, "max")
    return torch.stack([sums[0], sums[1], maxima[0], maxima[1], sums[2]], dim=1)


class Groups(NamedTuple):
    """The process groups of a call (None: not parallel) and their names, as the ops take them."""

    vocab: object
    context: object

    def names(self) -> tuple:
        return group_name(self.vocab), group_name(self.context)


def _dtensor_group(x: torch.Tensor, dim: int, name: str):
    """(local tensor, the mesh group x is sharded on along ``dim``) of a DTensor; (x, None) otherwise."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch without DTensor
        return x, None
    if not isinstance(x, DTensor):
        return x, None
    dim = dim % x.ndim
    sharded = [i for i, p in enumerate(x.placements) if isinstance(p, Shard) and p.dim % x.ndim == dim]
    others = [p for i, p in enumerate(x.placements) if i not in sharded and not isinstance(p, Replicate)]
    if len(sharded) != 1 or others:
        raise ValueError(f"{name}: a DTensor must be sharded along dimension {dim} (the vocabulary) on one mesh "
                         f"dimension and replicated on the others, got placements {x.placements}")
    return x.to_local(), x.device_mesh.get_group(sharded[0])


def _replicated(x, name: str):
    """A DTensor that is replicated (hidden states of a vocabulary-parallel head) as its local tensor."""
    try:
        from torch.distributed.tensor import DTensor, Replicate
    except ImportError:
        return x
    if isinstance(x, DTensor):
        if not all(isinstance(p, Replicate) for p in x.placements):
            raise ValueError(f"{name}: a DTensor here must be replicated, got placements {x.placements}")
        return x.to_local()
    return x


def unwrap(tensors: dict, shard_dim: int, vocab_group, context_group) -> tuple:
    """(local tensors, Groups): DTensor inputs as their local shards, the vocabulary group they imply
    (which must be ``vocab_group`` when both are given), and the groups checked for what they must be."""
    import torch.distributed as dist

    local, implied = {}, None
    for name, x in tensors.items():
        if x is None:
            local[name] = None
            continue
        if name in ("logits", "weight", "bias"):
            x, group = _dtensor_group(x, shard_dim if name == "logits" else 0, name)
            if group is not None:
                if implied is not None and implied is not group:
                    raise ValueError(f"{name} is sharded on another process group than the other DTensor inputs")
                implied = group
        else:
            x = _replicated(x, name)
        local[name] = x
    if implied is not None and vocab_group is not None and implied is not vocab_group:
        raise ValueError("vocab_group is not the process group the DTensor input is sharded on: pass one of them")
    vocab = vocab_group if vocab_group is not None else implied
    for name, group in (("vocab_group", vocab), ("context_group", context_group)):
        if group is not None:
            if not dist.is_initialized():
                raise ValueError(f"{name} needs torch.distributed to be initialized")
            if dist.get_rank(group) < 0:
                raise ValueError(f"{name}: this process (rank {dist.get_rank()}) is not a member of the group")
    if vocab is not None and vocab is context_group:
        raise ValueError("vocab_group and context_group are the same process group: a rank cannot hold both a "
                         "vocabulary shard and a token slice of one group (use two groups of a 2-D mesh)")
    return local, Groups(vocab, context_group)


def check_consistent(groups: Groups, width: int, labels: torch.Tensor, n_seq: int) -> None:
    """What every rank of the groups must agree on (validate=True: a few O(1) all-reduces, host syncs):
    equal vocabulary shards and equal labels over ``vocab``, the same number of sequences over
    ``context``."""
    if groups.vocab is not None:
        token = torch.tensor([width, -width, _checksum(labels), -_checksum(labels)], dtype=torch.float64,
                             device=labels.device)
        top = all_reduce(token.clone(), groups.vocab, "max")
        if top[0] != width or -top[1] != width:
            raise ValueError(f"vocab_group: the vocabulary shards have unequal widths (this rank's is {width}, "
                             f"they range over [{int(-top[1])}, {int(top[0])}]); split the vocabulary in equal shards")
        if top[2] != token[2] or top[3] != token[3]:
            raise ValueError("labels differ between the ranks of vocab_group: every rank needs the same "
                             "(full-vocabulary) labels")
    if groups.context is not None:
        top = all_reduce(torch.tensor([n_seq, -n_seq], dtype=torch.float64, device=labels.device), groups.context, "max")
        if top[0] != n_seq or -top[1] != n_seq:
            raise ValueError(f"context_group: the ranks hold different numbers of sequences (this one {n_seq}); every "
                             "rank holds a slice of every sequence")


def _checksum(labels: torch.Tensor) -> float:
    positions = torch.arange(1, labels.numel() + 1, device=labels.device, dtype=torch.float64)
    return float((labels.reshape(-1).double() * positions).sum() % 1e12)
