"""Padding-free (packed) SafeDPO batches: every sequence concatenated into one row, with cu_seqlens and
position_ids restarting at each sequence, as flash-attention's varlen API takes them. With flash-attn
installed on a GPU the model runs flash_attention_2; elsewhere SDPA, where transformers builds the same
block-diagonal attention from the position ids. The loss is the fused-linear one: no logits at all.

    python examples/packed_flash_attn.py --model Qwen/Qwen2.5-0.5B-Instruct --data pku.jsonl --steps 100
"""

import argparse
import importlib.util
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safedpo_kernels import labels_from_completion_mask, linear_safedpo_loss, linear_sequence_logps


def packed_batch(rows, tok, device, max_length=256):
    ids, completion, lengths, flags = [], [], [], ([], [])
    for side in (0, 1):  # chosen sequences first, then rejected ones
        for r in rows:
            k = r["better_response_id"] if side == 0 else 1 - r["better_response_id"]
            prompt = tok(f"User: {r['prompt']}\nAssistant: ")["input_ids"]
            response = tok(r[f"response_{k}"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seq = (prompt + response)[:max_length]
            ids += seq
            completion += ([0] * len(prompt) + [1] * len(response))[: len(seq)]
            lengths.append(len(seq))
            flags[side].append(bool(r[f"is_response_{k}_safe"]))
    ids = torch.tensor(ids, device=device)
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    labels = labels_from_completion_mask(ids, torch.tensor(completion, device=device), cu_seqlens=cu)
    return ids, positions, cu, labels, *(torch.tensor(f, device=device) for f in flags)


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
    rows = [json.loads(line) for line in open(a.data)]
    head = policy.get_output_embeddings()
    opt = torch.optim.AdamW(policy.parameters(), lr=a.lr)
    ref_table = {}
    for step in range(a.steps):
        start = step * a.pairs % len(rows)
        chunk = [rows[(start + i) % len(rows)] for i in range(a.pairs)]
        ids, positions, cu, labels, chosen_safe, rejected_safe = packed_batch(chunk, tok, device)
        inputs = dict(input_ids=ids[None], position_ids=positions[None])
        if start not in ref_table:  # the initial policy is the reference: its log-probs, computed once per batch
            with torch.no_grad():
                hidden = policy.get_decoder()(**inputs).last_hidden_state[0]
                ref_table[start] = linear_sequence_logps(hidden, head.weight, labels, bias=head.bias, cu_seqlens=cu)
        hidden = policy.get_decoder()(**inputs).last_hidden_state[0]
        out = linear_safedpo_loss(hidden, head.weight, labels, ref_table[start], chosen_safe, rejected_safe,
                                  bias=head.bias, cu_seqlens=cu, beta=0.1, delta=10.0)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(json.dumps(dict(step=step + 1, loss=round(out.loss.item(), 6), tokens=int(cu[-1]), flash=flash)))


if __name__ == "__main__":
    main()
