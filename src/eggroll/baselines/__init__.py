"""Baselines that share EGGROLL's harness: backprop.py (float minGRU LM trained by gradients)."""
