"""Integrations with other trainers: ``safedpo_kernels.integrations.trl`` (TRL's DPOTrainer)."""
