"""Baselines that share EGGROLL's models, tasks and harness, so comparisons are like for like.

    backprop  float minGRU byte LM trained by gradients (the baseline for EGG)
    grpo      GRPO for LLM fine-tuning (group-relative advantages, PPO clipping, optional KL)
    ppo       PPO (clipped surrogate + GAE) on the eggroll.tasks.rl environment adapters

Full-rank OpenES lives in eggroll.strategy (`open_es`), beside EGGROLL.
"""
