"""SafeDPO in a plain transformers training loop (no trainer): about sixty lines.

    python examples/hf_loop.py --model Qwen/Qwen2.5-0.5B-Instruct --data pku.jsonl --steps 100

--data is a jsonl file of PKU-SafeRLHF rows (safety flags as booleans, 0/1 or strings such as "false":
preference_pair reads them strictly). Hub ids download when the machine is online.
"""

import argparse
import copy
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safedpo_kernels import labels_from_completion_mask, safedpo_loss, sequence_logps
from safedpo_kernels.integrations.rows import preference_pair


def batch_of(pairs, tok, device, max_length=256):
    """Chosen sequences then rejected ones (chosen = the helpfulness-preferred response), right padded."""
    seqs, masks = [], []
    for side in ("chosen", "rejected"):
        for p in pairs:
            prompt = tok(f"User: {p['prompt']}\nAssistant: ")["input_ids"]
            response = tok(p[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append((prompt + response)[:max_length])
            masks.append(([0] * len(prompt) + [1] * len(response))[:max_length])
    L = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (L - len(s)) for s in seqs], device=device)
    attention = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs], device=device)
    completion = torch.tensor([m + [0] * (L - len(m)) for m in masks], device=device)
    flags = [torch.tensor([p[k] for p in pairs], device=device) for k in ("chosen_safe", "rejected_safe")]
    return ids, attention, labels_from_completion_mask(ids, completion), *flags


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--pairs", type=int, default=4, help="pairs per step")
    p.add_argument("--lr", type=float, default=1e-6)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(a.model)
    tok.pad_token = tok.pad_token or tok.eos_token
    policy = AutoModelForCausalLM.from_pretrained(a.model).to(device)
    ref_model = copy.deepcopy(policy).eval().requires_grad_(False)  # the reference: the initial policy, frozen
    pairs = [preference_pair(json.loads(line), f"{a.data}, line {n}") for n, line in enumerate(open(a.data), 1)
             if line.strip()]
    opt = torch.optim.AdamW(policy.parameters(), lr=a.lr)
    for step in range(a.steps):
        chunk = [pairs[(step * a.pairs + i) % len(pairs)] for i in range(a.pairs)]
        ids, attention, labels, chosen_safe, rejected_safe = batch_of(chunk, tok, device)
        with torch.no_grad():
            ref_logps = sequence_logps(ref_model(input_ids=ids, attention_mask=attention).logits, labels)
        logits = policy(input_ids=ids, attention_mask=attention).logits
        out = safedpo_loss(logits, labels, ref_logps, chosen_safe, rejected_safe, beta=0.1, delta=10.0,
                           inplace_backward=True)  # the gradient reuses the logits' memory
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(json.dumps(dict(step=step + 1, loss=round(out.loss.item(), 6), kept=int(out.kept.sum()))))


if __name__ == "__main__":
    main()
