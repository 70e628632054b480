"""tasks.heldout: held-out windows cover the split as documented, and the n-gram baselines are
scored on exactly the model's (context, target) pairs."""

import numpy as np
import pytest

from eggroll.tasks.heldout import heldout_windows, ngram_bits_on_windows


def test_windows_tile_each_stream_with_one_byte_overlap():
    data = np.arange(1000, dtype=np.int64).astype(np.uint8)
    w = heldout_windows(data, 0, streams=4, max_window=100)
    assert w.dtype == np.uint8 and w.shape[0] == 4
    n_win, t = w.shape[1], w.shape[2] - 1
    assert n_win * t >= (999 // 4) - n_win  # the whole share less what does not fill a window
    for s in range(4):
        start = s * 999 // 4
        flat = np.concatenate([w[s, 0]] + [w[s, k, 1:] for k in range(1, n_win)])
        np.testing.assert_array_equal(flat, data[start:start + n_win * t + 1])
        for k in range(1, n_win):  # overlap: a window starts with the previous one's last byte
            assert w[s, k, 0] == w[s, k - 1, -1]


def test_prefix_size_and_errors():
    data = np.random.default_rng(0).integers(0, 256, 100_000).astype(np.uint8)
    w = heldout_windows(data, 4096, streams=8)
    assert w[..., 1:].size == 4096
    with pytest.raises(ValueError, match="too small"):
        heldout_windows(data[:3], 0, streams=8)


def test_ngram_baseline_on_exact_pairs():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 4, 5000).astype(np.uint8)
    windows = rng.integers(0, 4, (3, 2, 9)).astype(np.uint8)
    got = ngram_bits_on_windows(train, windows)
    # brute force, add-one over 256 symbols; the train's first byte has the separator 0 as context
    uni = np.bincount(train, minlength=256) + 1.0
    ctx = np.concatenate([[0], train[:-1]])
    bi = np.ones((256, 256))
    np.add.at(bi, (ctx, train), 1)
    pairs = [(w[t], w[t + 1]) for w in windows.reshape(-1, 9) for t in range(8)]
    ref_uni = -np.mean([np.log2(uni[b] / uni.sum()) for _, b in pairs])
    ref_bi = -np.mean([np.log2(bi[a, b] / bi[a].sum()) for a, b in pairs])
    assert got["bytes"] == 48
    assert np.isclose(got["unigram"], ref_uni) and np.isclose(got["bigram"], ref_bi)
