"""Baselines that share EGGROLL's models, tasks and harness: backprop.py (float minGRU byte LM
trained by gradients, for EGG), grpo.py (GRPO for LLM fine-tuning)."""
