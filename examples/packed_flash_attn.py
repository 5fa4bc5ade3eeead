"""Padding-free (packed) SafeDPO batches: every sequence concatenated into one row, with cu_seqlens and
position_ids restarting at each sequence, as flash-attention's varlen API takes them. With flash-attn
installed on a GPU the model runs flash_attention_2; elsewhere SDPA, where transformers builds the same
block-diagonal attention from the position ids. The loss is the fused-linear one: no logits at all.

    python examples/packed_flash_attn.py --model Qwen/Qwen2.5-0.5B-Instruct --data pku.jsonl --steps 100

--data is a jsonl file of PKU-SafeRLHF rows, read strictly by preference_pair.
"""

import argparse
import copy
import importlib.util
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safedpo_kernels import labels_from_completion_mask, linear_safedpo_loss, linear_sequence_logps
from safedpo_kernels.integrations.rows import preference_pair


def packed_batch(pairs, tok, device, max_length=256):
    """One row of chosen sequences then rejected ones, with cu_seqlens and restarting position ids."""
    ids, completion, lengths = [], [], []
    for side in ("chosen", "rejected"):
        for p in pairs:
            prompt = tok(f"User: {p['prompt']}\nAssistant: ")["input_ids"]
            response = tok(p[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seq = (prompt + response)[:max_length]
            ids += seq
            completion += ([0] * len(prompt) + [1] * len(response))[: len(seq)]
            lengths.append(len(seq))
    ids = torch.tensor(ids, device=device)
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    labels = labels_from_completion_mask(ids, torch.tensor(completion, device=device), cu_seqlens=cu)
    flags = [torch.tensor([p[k] for p in pairs], device=device) for k in ("chosen_safe", "rejected_safe")]
    return ids, positions, cu, labels, *flags


def hidden_and_head(model, inputs):
    """The last hidden states (total, H) of a packed batch and the LM head's (weight, bias)."""
    head = model.get_output_embeddings()
    return model.get_decoder()(**inputs).last_hidden_state[0], head.weight, head.bias


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-6)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flash = device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    tok = AutoTokenizer.from_pretrained(a.model)
    attn = "flash_attention_2" if flash else "sdpa"
    policy = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation=attn).to(device)
    ref_model = copy.deepcopy(policy).eval().requires_grad_(False)  # the reference: the initial policy, frozen
    pairs = [preference_pair(json.loads(line), f"{a.data}, line {n}") for n, line in enumerate(open(a.data), 1)
             if line.strip()]
    opt = torch.optim.AdamW(policy.parameters(), lr=a.lr)
    for step in range(a.steps):
        chunk = [pairs[(step * a.pairs + i) % len(pairs)] for i in range(a.pairs)]
        ids, positions, cu, labels, chosen_safe, rejected_safe = packed_batch(chunk, tok, device)
        inputs = dict(input_ids=ids[None], position_ids=positions[None])
        with torch.no_grad():
            hidden, weight, bias = hidden_and_head(ref_model, inputs)
            ref_logps = linear_sequence_logps(hidden, weight, labels, bias=bias, cu_seqlens=cu)
        hidden, weight, bias = hidden_and_head(policy, inputs)
        out = linear_safedpo_loss(hidden, weight, labels, ref_logps, chosen_safe, rejected_safe, bias=bias,
                                  cu_seqlens=cu, beta=0.1, delta=10.0)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(json.dumps(dict(step=step + 1, loss=round(out.loss.item(), 6), tokens=int(cu[-1]), flash=flash)))


if __name__ == "__main__":
    main()
