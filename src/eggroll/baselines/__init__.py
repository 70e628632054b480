"""Baselines that share EGGROLL's models, tasks and harness: grpo.py (GRPO for LLM fine-tuning)."""
