"""Run by test_trl under torchrun (two CPU processes, gloo): SafeDPOTrainer with plain DPO and TRL's
DPOTrainer train two steps on the same model and data; rank 0 prints both trainers' logged metrics as one
JSON line after "LOGS "."""

import gc
import json
import sys

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from safedpo_kernels.integrations.trl import SafeDPOConfig, SafeDPOTrainer, pku_to_preference

model_dir, data_dir, out = sys.argv[1:4]
data = pku_to_preference(datasets.load_from_disk(data_dir)["train"]).select(range(16))
tok = AutoTokenizer.from_pretrained(model_dir)
common = dict(beta=0.1, per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3, report_to="none",
              save_strategy="no", use_cpu=True, seed=0, logging_steps=1, max_length=64, dataloader_num_workers=0,
              ddp_backend="gloo", bf16=False)
logs = {}
for name in ("ours", "trl"):
    torch.manual_seed(0)
    if name == "ours":
        t = SafeDPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tok,
                           args=SafeDPOConfig(output_dir=out + "/ours", delta=0.0, swap=False, drop_both_unsafe=False,
                                              **common), train_dataset=data)
    else:
        t = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tok,
                       args=DPOConfig(output_dir=out + "/trl", **common),
                       train_dataset=data.remove_columns(["chosen_safe", "rejected_safe"]))
    t.train()
    logs[name] = [h for h in t.state.log_history if "loss" in h and "train_runtime" not in h]
if torch.distributed.get_rank() == 0:
    print("LOGS " + json.dumps(logs), flush=True)
# End the group while this script holds the GIL-releasing path to it: left to the interpreter's exit, the DDP
# reducers' references end it from a destructor whose gloo workers can no longer take the GIL, and a rank
# aborts ("terminate called without an active exception") after a passing run (seen once in CI).
del t
gc.collect()
torch.distributed.barrier()
torch.distributed.destroy_process_group()
