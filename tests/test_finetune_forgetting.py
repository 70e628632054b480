"""Forgetting and coverage measurements: the unbiased Pass@K estimator against brute force, the
held-out token NLL against the model's own logits, the drift norm, and coverage end to end."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eggroll.models import transformer as tfm
from eggroll.tasks.char_tokenizer import CharTokenizer
from eggroll.tasks.forgetting import coverage, default_ks, drift, mean_token_nll, pass_at_k, pass_at_k_table
from eggroll.tasks.reasoning import custom_task

TINY = tfm.TransformerConfig(vocab_size=CharTokenizer().vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=8, intermediate_size=32, max_position=64)


def _brute_force(n, c, k):
    """Fraction of the k-subsets of n samples (c correct) that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)  # pass@1 is the plain success rate
    table = pass_at_k_table([0, 16, 4], 16, [1, 16])
    assert table == {"pass@1": pytest.approx((0 + 1 + 0.25) / 3), "pass@16": pytest.approx(2 / 3)}
    assert default_ks(16) == [1, 2, 4, 8, 16] and default_ks(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(4, 1, 5)


def _reference_nll(params, tok, texts, first):
    """Nats per token of texts[b][first:] given what precedes, from full forward logits."""
    total, count = 0.0, 0
    for t in texts:
        x = jnp.asarray(tok.encode(t), jnp.int32)
        logp = np.asarray(jax.nn.log_softmax(tfm.forward(params, TINY, x, jnp.arange(len(x)))[0], axis=-1))
        idx = np.arange(first - 1, len(x) - 1)
        total -= float(logp[idx, np.asarray(x)[idx + 1]].sum())
        count += len(idx)
    return total / count


def test_mean_token_nll_matches_the_model_logits():
    params = tfm.init_params(jax.random.PRNGKey(0), TINY, std=0.3)
    tok = CharTokenizer()
    texts = ["3*5+7", "10-2", "1"]
    ids, lens = tok.encode_batch(texts, length=6)
    assert mean_token_nll(params, TINY, ids, lens, batch=2) == pytest.approx(_reference_nll(params, tok, texts, 1),
                                                                             rel=1e-5)
    # context: the first 2 tokens of each row are given, not scored
    got = mean_token_nll(params, TINY, ids, lens, context=[2, 2, 2], batch=2)
    assert got == pytest.approx(_reference_nll(params, tok, texts, 2), rel=1e-5)


def test_drift_norm():
    a, b = {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([0.0, 0.0]), }
    assert drift(a, {"w": jnp.array([3.0, 4.0])})["drift_norm"] == 0.0
    d = drift(a, b | {"w": jnp.array([0.0, 8.0])})
    assert d["drift_norm"] == pytest.approx(5.0) and d["drift_rel"] == pytest.approx(5 / 8)


def test_coverage_counts_correct_samples():
    params = tfm.init_params(jax.random.PRNGKey(0), TINY, std=0.3)
    problems = [{"question": "1 2>3:"}, {"question": "4>4:"}, {"question": "9>9:"}]
    always = custom_task(lambda text, ex: 1.0, problems)
    never = custom_task(lambda text, ex: 0.0, problems)
    kw = dict(prompt_len=6, max_new_tokens=3, samples=4, temperature=1.0, batch=5)
    assert coverage(params, TINY, CharTokenizer(), always, problems, **kw)["pass@4"] == 1.0
    res = coverage(params, TINY, CharTokenizer(), never, problems, **kw)
    assert res["pass@1"] == 0.0 and res["pass@4"] == 0.0 and res["samples"] == 4 and res["problems"] == 3
    # a reward that holds for some samples only: pass@1 <= pass@2 <= pass@4
    some = custom_task(lambda text, ex: float("7" in text or "1" in text), problems)
    r = coverage(params, TINY, CharTokenizer(), some, problems, **kw)
    assert r["pass@1"] <= r["pass@2"] <= r["pass@4"]
