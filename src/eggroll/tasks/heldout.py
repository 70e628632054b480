"""Held-out evaluation data for byte language models: parallel streams cut into windows, and the
unigram / bigram baselines scored on exactly the (context, target) byte pairs the model scores.

    windows = heldout_windows(valid, n_bytes=65536, streams=64)   # (streams, n_windows, T + 1)
    base = ngram_bits_on_windows(train, windows)                 # {"unigram": ..., "bigram": ...}

Stream s reads the split contiguously from offset s * len // streams; its bytes are cut into
n_windows windows of T bytes each plus one byte of overlap (the next window's first byte), so a
model that carries its hidden state across a stream's windows predicts every byte of the stream
after the first exactly once. n_bytes = 0 evaluates (almost) the whole split: each stream
covers its whole share, less the < n_windows bytes that do not fill a window.
"""

from __future__ import annotations

import numpy as np

from .text import ngram_counts

MAX_WINDOW = 512  # bytes per window: bounds the (streams, window, 256) logits of one scan step


def heldout_windows(data: np.ndarray, n_bytes: int = 0, streams: int = 64,
                    max_window: int = MAX_WINDOW) -> np.ndarray:
    """uint8 (streams, n_windows, T + 1): about n_bytes scored bytes (0: the whole split)."""
    data = np.asarray(data, np.uint8)
    if streams < 1 or n_bytes < 0 or max_window < 1:
        raise ValueError(f"need streams >= 1, n_bytes >= 0, max_window >= 1; got {streams}, {n_bytes}, {max_window}")
    share = (len(data) - 1) // streams  # bytes a stream can score (it needs one more as input)
    per_stream = share if n_bytes == 0 else min(share, -(-n_bytes // streams))
    if per_stream < 1:
        raise ValueError(f"held-out split of {len(data)} bytes is too small for {streams} streams")
    n_windows = -(-per_stream // max_window)
    window = per_stream // n_windows
    starts = (np.arange(streams, dtype=np.int64) * (len(data) - 1)) // streams
    idx = starts[:, None, None] + np.arange(n_windows)[None, :, None] * window + np.arange(window + 1)
    return data[idx]


def ngram_bits_on_windows(train: np.ndarray, windows: np.ndarray, k: float = 1.0) -> dict:
    """Add-k unigram and bigram (fit on `train`) bits/byte on exactly the pairs
    (windows[..., t], windows[..., t + 1]) that a model reading `windows` scores."""
    uni, bi = ngram_counts(np.asarray(train, np.uint8))
    log_uni = np.log2((uni + k) / (uni.sum() + 256 * k))
    log_bi = np.log2((bi + k) / (bi.sum(axis=1, keepdims=True) + 256 * k))
    ctx = windows[..., :-1].astype(np.int64).ravel()
    tgt = windows[..., 1:].astype(np.int64).ravel()
    return {"unigram": float(-log_uni[tgt].mean()), "bigram": float(-log_bi[ctx, tgt].mean()),
            "bytes": int(tgt.size)}
