"""Baselines that share the ES harness, so comparisons are like for like.

    ppo   PPO (clipped surrogate + GAE) on the eggroll.tasks.rl environment adapters.

Full-rank OpenES lives in eggroll.strategy (`open_es`), beside EGGROLL.
"""
