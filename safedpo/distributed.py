"""Processes and devices: one process, or many under ``torchrun`` (DDP, or FSDP2 with fsdp=true; with
tensor_parallel=p, groups of p ranks share each LM head and decoder layer, and the world's other factor
splits the data)."""

from __future__ import annotations

import gc
import logging
import os
import sys

import torch
import torch.distributed as dist

from .versions import major_minor


class Dist:
    """Rank, world size and device of this process (a single process is rank 0 of 1).

    With ``tensor_parallel`` p > 1 the world is a (data, tensor) = (world / p, p) device mesh: the p
    ranks of a row (consecutive ranks, one node) share each model's sharded layers and see the same
    batches; ``data_rank`` / ``data_world`` say which share of a global batch this row takes."""

    def __init__(self, device_pref: str = "auto", tensor_parallel: int = 1):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
        self.device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if self.world % tensor_parallel:
            raise ValueError(f"tensor_parallel: {tensor_parallel} does not divide the {self.world} processes "
                             "(torchrun --nproc_per_node x nodes)")
        self.tensor_parallel = tensor_parallel
        self.data_world = self.world // tensor_parallel
        self.data_rank = self.rank // tensor_parallel
        if use_cuda:
            torch.cuda.set_device(self.device)
        # A process group this run starts is this run's to end (close); a caller's own stays as it was.
        self.owns_group = self.world > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if use_cuda else "gloo")
        self.tp_mesh = self.dp_mesh = self._data_group = None
        if tensor_parallel > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (self.data_world, tensor_parallel), mesh_dim_names=("data", "tensor"))
            self.tp_mesh, self.dp_mesh = mesh["tensor"], mesh["data"]
            self._data_group = self.dp_mesh.get_group()
            # DTensor warns on every gradient norm and full state dict of a 2-D mesh that it takes two
            # collectives, not one: true, and immaterial for scalars and the final save; noise in a log.
            logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values) -> list:
        """``values`` summed over the data-parallel ranks (the ranks of a tensor-parallel group hold the
        same batch and the same results: they count once)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.data_world > 1:
            dist.all_reduce(t, group=self._data_group)
        return t.tolist()

    def max(self, values) -> list:
        """``values`` maxed over every rank (tensor-parallel ranks too): flags all ranks must agree on."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """End the process group this run started. Call it after the models, optimizers and DDP / FSDP2
        wrappers that used the group are gone (``gc.collect()`` included: FSDP2's modules hold it in
        reference cycles), so that the group's last reference is this method's.

        The group's C++ destructor joins gloo's worker threads, and a worker may still be releasing
        the last collective's tensors, which takes the GIL. Through the group's own binding the GIL is
        released while they are joined; from DDP's reducer it is not (a rank hung after its final
        barrier), and during the interpreter's exit a worker can no longer take it (a rank aborted with
        "terminate called without an active exception" after an FSDP2 run). Left holders are logged."""
        if not (self.owns_group and dist.is_initialized()):
            return
        held = [g for g in (dist.group.WORLD, self._data_group) if g is not None]
        self.tp_mesh = self.dp_mesh = self._data_group = None
        release_device_meshes()
        dist.destroy_process_group()
        self.owns_group = False
        others = [sys.getrefcount(g) - 3 for g in held]  # less the list's, the loop's and the call's own
        if any(others):
            logging.getLogger(__name__).warning(
                "the process group is still held by %d other objects after the run closed; it is destroyed "
                "when they are, possibly during the interpreter's exit", sum(others))
        del held


def release_device_meshes() -> None:
    """Empties every device mesh's registry of process groups: DTensor's sharding caches keep the meshes
    FSDP2 and tensor parallelism made for as long as the process lives, and with them the groups."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # a torch built without distributed
        return
    for obj in gc.get_objects():
        if isinstance(obj, DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()


def rank_slice(indices, rank: int, world: int):
    """This rank's share of a global batch's example indices."""
    per = len(indices) // world
    return indices[rank * per : (rank + 1) * per]


# The oldest torch whose FSDP2 and tensor parallelism train as one process does (tested: 2.11 and 2.13).
# torch 2.7's FSDP2 gives another loss from the third step on (1.5e-3 apart, the logits and the eager
# paths alike) and refuses the (data, tensor) mesh; its tensor parallelism alone trains as one process.
SHARDED_TORCH = (2, 11)


def wrap_distributed(policy, fsdp: bool, procs: Dist):
    """The policy as the training step calls it: itself (one process), FSDP2-sharded, or under DDP.
    With tensor parallelism its layers are sharded over each row of the mesh first, and FSDP2 (always:
    DDP takes no sharded parameters) shards them further over the data-parallel ranks."""
    if procs.world == 1:
        return policy
    if (fsdp or procs.tensor_parallel > 1) and procs.data_world > 1 and major_minor() < SHARDED_TORCH:
        what = "tensor_parallel over several data-parallel rows" if procs.tensor_parallel > 1 else "fsdp"
        raise RuntimeError(f"{what} (FSDP2) needs torch >= {'.'.join(map(str, SHARDED_TORCH))} (this is "
                           f"{torch.__version__}, whose FSDP2 trains differently from one process); upgrade "
                           f"torch, or use DDP (fsdp: false)")
    if procs.tensor_parallel > 1:
        tensor_parallelize(policy.model, procs.tp_mesh)
    if fsdp or procs.tensor_parallel > 1:
        if procs.data_world == 1:
            return policy
        from torch.distributed.fsdp import fully_shard
        for layer in policy.model.get_decoder().layers:
            fully_shard(layer, mesh=procs.dp_mesh)
        fully_shard(policy, mesh=procs.dp_mesh)
        return policy
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(policy, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)


def decoder_plan(model, p: int) -> tuple:
    """(plan, why not): the decoder's layers as transformers' base_model_tp_plan shards them, when every
    entry is a plain column or row split (Megatron's attention and MLP) and the heads and MLP width divide
    by ``p``; else (None, the reason), and only the LM head is sharded."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    config = getattr(model.config, "text_config", None) or model.config
    plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    if not plan:
        return None, f"{type(config).__name__} has no base_model_tp_plan"
    styles = set(plan.values())
    if not styles <= {"colwise", "rowwise"}:
        return None, f"its tp_plan uses {sorted(styles - {'colwise', 'rowwise'})}, which this trainer does not apply"
    sizes = {k: getattr(config, k, None) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")}
    uneven = [f"{k}={v}" for k, v in sizes.items() if v is None or v % p]
    if uneven:
        return None, f"{', '.join(uneven)} not divisible by tensor_parallel={p}"
    prefix = model.base_model_prefix
    return {f"{prefix}.{k}": ColwiseParallel() if v == "colwise" else RowwiseParallel() for k, v in plan.items()}, None


def tensor_parallelize(model, mesh) -> None:
    """Shard a causal LM over ``mesh`` (1-D, p ranks) in place: the LM head by vocabulary (rank r holds
    rows [r V/p, (r+1) V/p) of its weight; the logits stay a DTensor sharded on their last dimension, which
    the kernels take as a vocabulary-parallel input, so they are never gathered) and, where transformers'
    tp_plan allows, the attention and MLP projections. Parameters left whole are the same on every rank and
    get the same gradients there (d hidden comes back complete on every rank)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    p = mesh.size()
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"tensor_parallel needs a linear LM head; {type(model).__name__} has {type(head).__name__}")
    embed = model.get_input_embeddings()
    if embed is not None and embed.weight is head.weight:
        raise ValueError("tensor_parallel shards the LM head, which this model ties to its input embeddings "
                         "(tie_word_embeddings); untie them or train without tensor_parallel")
    if head.out_features % p:
        raise ValueError(f"tensor_parallel: {p} needs a vocabulary divisible by {p}, got {head.out_features}; pad the "
                         f"embeddings (model.resize_token_embeddings(n, pad_to_multiple_of={p})) before training")
    name = next(n for n, m in model.named_modules() if m is head)
    plan, why_not = decoder_plan(model, p)
    if dist.get_rank() == 0:
        what = f"the LM head only ({why_not})" if why_not else f"the LM head and the decoder's {', '.join(sorted(plan))}"
        print(f"safedpo: tensor_parallel={p} shards {what}", file=sys.stderr)
    plan = dict(plan or {}, **{name: ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})
    parallelize_module(model, mesh, plan)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a model whose parameters are partly DTensors (sharded over a
    mesh) and partly plain tensors (the same on every rank), which torch's own does not mix: the norm of
    every gradient counted once, whole; returns the total norm before clipping."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    squares = []
    for g in grads:
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    for g in grads:
        g.mul_(coef)
    return total


def full_model_state(model) -> dict:
    """The whole FSDP-sharded model's state dict, gathered to the CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
