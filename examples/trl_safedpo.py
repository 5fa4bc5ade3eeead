"""SafeDPO with TRL's trainer: SafeDPOTrainer is TRL's DPOTrainer with the safety flags kept through its
data pipeline and the loss computed by the fused kernels.

    pip install 'safedpo-kernels[trl]'
    python examples/trl_safedpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset PKU-Alignment/PKU-SafeRLHF-30K

--dataset is a Hub id (downloads when online), a directory written by save_to_disk, or a jsonl file of
PKU-SafeRLHF rows.
"""

import argparse
import os

import torch
from datasets import load_dataset, load_from_disk

from safedpo_kernels.integrations.trl import SafeDPOConfig, SafeDPOTrainer, pku_to_preference


def load(name: str):
    if name.endswith((".json", ".jsonl")):
        return load_dataset("json", data_files=name, split="train")
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        return load_from_disk(name)["train"]
    return load_dataset(name, split="train")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--output-dir", default="runs/trl-safedpo")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--loss-input", default="logits", choices=["logits", "linear"])
    a = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    args = SafeDPOConfig(
        output_dir=a.output_dir, beta=0.1, delta=10.0, max_steps=a.steps, per_device_train_batch_size=2,
        learning_rate=1e-6, precompute_ref_log_probs=True, fused_loss_input=a.loss_input, logging_steps=1,
        report_to="none", save_strategy="no", max_length=512, bf16=gpu, use_cpu=not gpu,
    )
    trainer = SafeDPOTrainer(model=a.model, args=args, train_dataset=pku_to_preference(load(a.dataset)))
    trainer.train()
    print({k: v for k, v in trainer.state.log_history[-1].items()})


if __name__ == "__main__":
    main()
