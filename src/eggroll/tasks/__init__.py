"""Tasks: data and evaluation for recipes (text.py: byte-level corpora, n-gram bits/byte)."""
