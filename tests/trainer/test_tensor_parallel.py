"""tensor_parallel: p in the trainer (torchrun, gloo): the LM head sharded by vocabulary (the kernels take the
logits or the head weight as shards, nothing is gathered) and the decoder's projections by transformers'
tp_plan; with more ranks than p, FSDP2 over the data-parallel ranks of a 2-D mesh. The losses are those of
one process, a resumed run continues exactly, and a model it cannot shard is refused by name."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from tiny_runs import TINY, config, losses, needs_sharded_torch, torchrun  # noqa: E402

# several CPU processes per test: one such test at a time (make test runs xdist with --dist loadgroup)
pytestmark = pytest.mark.xdist_group("processes")

# Four heads, two of them key/value, and an even vocabulary (the toy tokenizer's 121 ids and one spare):
# both halves of every sharded layer are equal in size.
TP_MODEL = dict(TINY, num_attention_heads=4, num_key_value_heads=2, vocab_size=122)


def final_weights(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out / "final")).state_dict()


def close(a, b, tol=1e-5):
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tol


def test_two_ranks_sharing_the_model_train_as_one_process_and_resume(task, tmp_path):
    """tensor_parallel: 2 on 2 ranks: the losses of 4 steps equal one process's; interrupted after step 2
    (sharded checkpoint) and resumed -- the resumed half through the fused-linear path on the sharded
    head weight, the first through the sharded logits -- the same again, and the final model too."""
    from safedpo.train import train

    kw = dict(tiny_model=TP_MODEL, max_steps=4, save_every=2)
    train(config(task, tmp_path / "one", **kw))
    res = torchrun(config(task, tmp_path / "tp", tensor_parallel=2, stop_at_step=2, **kw))
    assert "tensor_parallel=2 shards the LM head and the decoder's model.layers.*.mlp.down_proj" in res.stderr
    step2 = tmp_path / "tp" / "checkpoints" / "step-2"
    assert (step2 / "shards").is_dir() and (step2 / "rng-1.pt").exists()
    res = torchrun(config(task, tmp_path / "tp", tensor_parallel=2, loss_input="linear", **kw))
    assert "resumed from" in res.stderr and "at step 2" in res.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "tp")
    assert close(a, b), (a, b)
    one, tp = final_weights(tmp_path / "one"), final_weights(tmp_path / "tp")
    assert one.keys() == tp.keys()
    assert max((one[k] - tp[k]).abs().max().item() for k in one) <= 1e-4
    # Resuming the sharded checkpoint on another layout is refused, naming the key.
    res_other = None
    try:
        torchrun(config(task, tmp_path / "tp", tensor_parallel=1, max_steps=5, save_every=2, tiny_model=TP_MODEL))
    except AssertionError as exc:
        res_other = str(exc)
    assert res_other is not None and "tensor_parallel: 2 -> 1" in res_other


@needs_sharded_torch
def test_a_2x2_mesh_of_data_and_tensor_parallel_ranks_trains_as_one_process(task, tmp_path):
    """4 ranks: 2 tensor-parallel pairs, FSDP2 over the 2 data-parallel ranks; 2 pairs per rank make the
    one-process run's global batch of 4."""
    from safedpo.train import train

    train(config(task, tmp_path / "one", tiny_model=TP_MODEL, max_steps=3, batch_size=4, loss_input="linear"))
    torchrun(config(task, tmp_path / "mesh", tiny_model=TP_MODEL, max_steps=3, batch_size=2, tensor_parallel=2,
                    loss_input="linear"), nproc=4)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "mesh")
    assert close(a, b), (a, b)


class _Mesh:
    """What tensor_parallelize reads of a device mesh before it shards anything."""

    def size(self):
        return 2


@pytest.mark.parametrize("change, words", [
    (dict(tie_word_embeddings=True), "ties to its input embeddings"),
    (dict(vocab_size=121), "a vocabulary divisible by 2, got 121"),
])
def test_models_it_cannot_shard_are_refused(change, words):
    from transformers import LlamaConfig, LlamaForCausalLM

    from safedpo.distributed import tensor_parallelize

    model = LlamaForCausalLM(LlamaConfig(**dict(TP_MODEL, **change)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=words):
        tensor_parallelize(model, _Mesh())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_layout_the_processes_do_not_fit_is_refused(task, tmp_path):
    from safedpo.train import train

    with pytest.raises(ValueError, match="tensor_parallel: 2 does not divide the 1 processes"):
        train(config(task, tmp_path / "run", tiny_model=TP_MODEL, tensor_parallel=2))
    with pytest.raises(ValueError, match="does not combine with lora"):
        train(config(task, tmp_path / "run", tiny_model=TP_MODEL, tensor_parallel=2, lora=dict(r=4)))
