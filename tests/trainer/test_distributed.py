"""Training on several processes (torchrun on gloo): DDP and FSDP2 match one process, an FSDP2 run resumes
bitwise from its sharded checkpoints, and sharded training on a torch that trains it differently is refused."""


import json
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from tiny_runs import SHARDED_OK, TORCHRUN, config, losses, needs_sharded_torch, safedpo_command, torchrun  # noqa: E402


@pytest.mark.xdist_group("processes")
def test_torchrun_two_processes_match_one(task, tmp_path):
    """2 ranks x 2 pairs (gloo) versus 1 rank x 4 pairs: the same global batches, the same losses."""
    from safedpo.evaluate import evaluate_checkpoint
    from safedpo.train import train

    train(config(task, tmp_path / "one", max_steps=3, batch_size=4))
    torchrun(config(task, tmp_path / "two", max_steps=3, batch_size=2))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5
    # `safedpo eval` under torchrun: each rank evaluates the whole set, the same metrics as one process
    res = safedpo_command(["eval", "--config", str((tmp_path / "two").with_suffix(".yaml")),
                           f"checkpoint={tmp_path / 'two' / 'final'}"], launcher=TORCHRUN)
    one = evaluate_checkpoint(config(task, tmp_path / "two"), str(tmp_path / "two" / "final"))
    ranks = [json.loads(block) for block in re.findall(r"^\{.*?^\}", res.stdout, re.S | re.M)]
    assert len(ranks) == 2 and all(abs(r["eval_loss"] - one["eval_loss"]) <= 1e-6 for r in ranks), res.stdout
    if not SHARDED_OK:
        return
    # FSDP2 (fully_shard, gloo on the CPU): the same losses, and a final model gathered from the shards.
    torchrun(config(task, tmp_path / "fsdp", max_steps=3, batch_size=2, fsdp=True))
    c = losses(tmp_path / "fsdp")
    assert max(abs(x - y) for x, y in zip(a, c)) <= 1e-5
    from transformers import AutoModelForCausalLM

    one = AutoModelForCausalLM.from_pretrained(str(tmp_path / "one" / "final")).state_dict()
    sharded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fsdp" / "final")).state_dict()
    assert max((one[k] - sharded[k]).abs().max().item() for k in one) <= 1e-4


@pytest.mark.parametrize("fsdp, tensor_parallel", [(True, 1), (False, 2)])
def test_sharded_training_on_a_torch_that_trains_it_differently_is_refused(monkeypatch, fsdp, tensor_parallel):
    """torch 2.7's FSDP2 gave another loss from the third step on (and refused the 2-D mesh): sharded
    training there is an error naming the setting and the torch it needs, never a different model."""
    import types

    from safedpo import distributed

    procs = types.SimpleNamespace(world=4, tensor_parallel=tensor_parallel, data_world=4 // tensor_parallel)
    monkeypatch.setattr(distributed, "major_minor", lambda: (2, 7))
    with pytest.raises(RuntimeError, match=("fsdp" if fsdp else "tensor_parallel over several") + r".* needs torch >= 2\.11"):
        distributed.wrap_distributed(torch.nn.Linear(2, 2), fsdp, procs)
    procs.world = 1  # one process: nothing to wrap, on any torch
    assert isinstance(distributed.wrap_distributed(torch.nn.Linear(2, 2), fsdp, procs), torch.nn.Linear)


@pytest.mark.xdist_group("processes")
@needs_sharded_torch
def test_fsdp_resume_is_bitwise_equal(task, tmp_path):
    """FSDP2 on 2 gloo ranks: sharded checkpoints (torch.distributed.checkpoint); an interrupted run resumed
    on the same number of ranks gives bitwise the losses and final weights of an uninterrupted one."""
    from transformers import AutoModelForCausalLM

    def run(name, **kw):
        torchrun(config(task, tmp_path / name, batch_size=2, fsdp=True, **kw))

    run("straight", max_steps=4)
    run("resumed", max_steps=4, save_every=2, stop_at_step=2)
    shards = tmp_path / "resumed" / "checkpoints" / "step-2"
    assert (shards / "shards").is_dir() and (shards / "rng-1.pt").exists()
    run("resumed", max_steps=4, save_every=2, resume="auto")
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(a) == len(b) == 4 and a == b
    one = AutoModelForCausalLM.from_pretrained(str(tmp_path / "straight" / "final")).state_dict()
    two = AutoModelForCausalLM.from_pretrained(str(tmp_path / "resumed" / "final")).state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
