"""Processes and devices: one process, or many under ``torchrun`` (DDP, or FSDP2 with fsdp=true)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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


def rank_slice(indices, rank: int, world: int):
    """This rank's share of a global batch's example indices."""
    per = len(indices) // world
    return indices[rank * per : (rank + 1) * per]


def wrap_distributed(policy, fsdp: bool, dd: Dist):
    """The policy as the training step calls it: itself (one process), FSDP2-sharded, or under DDP."""
    if dd.world == 1:
        return policy
    if fsdp:
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


def full_model_state(model) -> dict:
    """The whole FSDP-sharded model's state dict, gathered to the CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
