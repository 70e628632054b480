"""The fine-tuners' speed options change nothing but speed: grouped rows, the score cache, the
skipped GRPO old-log-prob forward, completion-only log-probs, donated updates; plus bfloat16
compute and the anchored decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eggroll.baselines import grpo
from eggroll.models import transformer as tfm
from eggroll.tasks.char_tokenizer import CharTokenizer
from eggroll.tasks.finetune import anchored, es_finetuner, score_rows
from eggroll.tasks.reasoning import custom_task

TINY = tfm.TransformerConfig(vocab_size=CharTokenizer().vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=8, intermediate_size=32, max_position=64)
PROMPTS = [{"question": "1 2>3:"}, {"question": "4 5>9:"}, {"question": "9>9:"}, {"question": "7>7:"}]


class Counting:
    """A reward (sevens / 4) that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, text, ex):
        self.calls += 1
        return text.count("7") / 4


def _leaves_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _leaves_close(a, b):
    """Equal up to float rounding: a separately compiled old-log-prob forward is not bitwise the
    training forward, so with it the first ratio is 1 +- 1e-7 instead of exactly 1."""
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def _es_step(params, **kw):
    reward = Counting()
    task = custom_task(reward, PROMPTS)
    ft = es_finetuner(TINY, CharTokenizer(), task, optax.sgd(0.1), population=8, sigma=0.2, prompt_len=6,
                      max_new_tokens=4, **kw)
    ctx = ft.setup(jax.random.PRNGKey(1), params)
    state, m = ft.step(ctx, ft.init(ctx, params), task.examples)
    return state, m, reward.calls


def test_es_grouped_rows_and_score_cache_change_nothing():
    params = tfm.init_params(jax.random.PRNGKey(0), TINY, std=0.3)
    plain, m0, calls0 = _es_step(params, group_rows=False, score_cache=False)
    fast, m1, calls1 = _es_step(params, group_rows=True, score_cache=True)
    chunked, m2, _ = _es_step(params, group_rows=True, score_cache=True, max_rows=8)  # groups of 4 in chunks of 8
    assert calls0 == 8 * len(PROMPTS) and calls1 < calls0  # greedy members repeat themselves
    for m in (m1, m2):
        assert {k: m[k] for k in m0} == m0
    _leaves_equal(plain.params, fast.params)
    _leaves_equal(plain.params, chunked.params)


def test_score_rows_scores_each_distinct_pair_once():
    reward = Counting()
    task = custom_task(reward, PROMPTS)
    texts = ["77", "7", "77", "77", "", "7"]
    index = [0, 0, 0, 1, 1, 0]  # "77" for prompt 0 three times... once per (prompt, text)
    s, a, n = score_rows(task, texts, PROMPTS, index)
    s0, a0, n0 = score_rows(task, texts, PROMPTS, index, cache=False)
    assert n == 4 and n0 == 6 and reward.calls == 10
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(s, [0.5, 0.25, 0.5, 0.5, 0.0, 0.25])


def _grpo_batch(cfg, params):
    fn = grpo.transformer_logprob_fn(cfg)
    prompts = jnp.array([[0, 4, 5], [0, 4, 5], [6, 7, 8], [6, 7, 8]])
    comps = jnp.array([[3, 3, 2], [9, 2, 0], [1, 2, 0], [10, 10, 2]])
    b = grpo.build_batch(prompts, [2, 2, 3, 3], comps, [3, 2, 2, 3], jnp.array([1.0, -1.0, -0.5, 0.5]), None)
    return fn, b


def test_grpo_skipped_old_forward_gives_the_same_loss_and_gradient():
    cfg = tfm.TransformerConfig(vocab_size=11, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                head_dim=8, intermediate_size=32)
    params = tfm.init_params(jax.random.PRNGKey(0), cfg)
    fn, b = _grpo_batch(cfg, params)
    g = grpo.make_grpo(fn, optax.adam(1e-2), completion_len=3, kl_coef=0.05)
    old = g.logprobs(params, b.tokens, b.positions)
    with_old, without = b._replace(old_logp=old, ref_logp=old), b._replace(old_logp=None, ref_logp=old)

    def loss_and_grad(batch):
        def loss(p):
            return grpo.grpo_loss(grpo.completion_logprobs(fn, p, batch.tokens, batch.positions, 3), batch,
                                  kl_coef=0.05)[0]
        return jax.value_and_grad(loss)(params)

    (l0, g0), (l1, g1) = loss_and_grad(with_old), loss_and_grad(without)
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    _leaves_close(g0, g1)
    _, m1 = grpo.grpo_loss(grpo.completion_logprobs(fn, params, b.tokens, b.positions, 3), without)
    assert float(m1["ratio_mean"]) == 1.0 and float(m1["clip_frac"]) == 0.0  # exactly: no second forward
    with pytest.raises(ValueError, match="minibatches = epochs = 1"):
        grpo.make_grpo(fn, optax.sgd(0.1), completion_len=3, minibatches=2).update(
            params, optax.sgd(0.1).init(params), without, jax.random.PRNGKey(0))


def test_completion_only_logprobs_equal_full_ones():
    cfg = tfm.TransformerConfig(vocab_size=11, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                head_dim=8, intermediate_size=32, tie_embeddings=True)
    params = tfm.init_params(jax.random.PRNGKey(3), cfg, std=0.3)
    _, b = _grpo_batch(cfg, params)
    full = grpo.completion_logprobs(grpo.transformer_logprob_fn(cfg), params, b.tokens, b.positions, 3)
    last = grpo.completion_logprobs(grpo.transformer_logprob_fn(cfg, last=3), params, b.tokens, b.positions, 3)
    assert last.shape == full.shape == (4, 3)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full), rtol=1e-6, atol=1e-6)
    # and against the model's own full-vocabulary logits at every position
    logits = jax.vmap(lambda t, p: tfm.forward(params, cfg, t, p)[0])(b.tokens, b.positions)
    ref = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), b.tokens[:, 1:, None], -1)[:, -3:, 0]
    np.testing.assert_allclose(np.asarray(last), np.asarray(ref), rtol=1e-5, atol=1e-5)


def _grpo_step(params, **kw):
    task = custom_task(Counting(), PROMPTS[:2])
    ft = grpo.grpo_finetuner(TINY, CharTokenizer(), task, optax.adam(1e-2), group_size=4, prompt_len=6,
                             max_new_tokens=4, **kw)
    st = ft.init(jax.random.PRNGKey(2), params)
    return st, ft.step(st, task.examples)


def test_grpo_finetuner_without_old_forward_is_identical_and_donates():
    params = tfm.init_params(jax.random.PRNGKey(0), TINY, std=0.3)
    st0, (a, ma) = _grpo_step(params, reuse_logprobs=False, score_cache=False)
    st1, (b, mb) = _grpo_step(params)
    _leaves_close(a.params, b.params)
    assert ma.keys() == mb.keys() and all(mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-7) for k in ma)
    assert mb["ratio_mean"] == 1.0  # the skipped forward: the ratio is exactly 1
    # the update is donated: the old state's buffers are gone, the caller's params are not
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(st1.params))
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(params))
    chunked = _grpo_step(params, max_rows=4)[1][0]  # sampled 4 rows at a time: other draws, same shapes
    assert jax.tree_util.tree_structure(chunked.params) == jax.tree_util.tree_structure(a.params)


def test_es_update_is_donated_and_callers_params_survive():
    params = tfm.init_params(jax.random.PRNGKey(0), TINY, std=0.3)
    task = custom_task(Counting(), PROMPTS)
    ft = es_finetuner(TINY, CharTokenizer(), task, optax.adam(1e-2), population=4, sigma=0.2, prompt_len=6,
                      max_new_tokens=4)
    ctx = ft.setup(jax.random.PRNGKey(1), params)
    st = ft.init(ctx, params)
    ft.step(ctx, st, task.examples)
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves((st.params, st.opt_state)))
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_masters():
    params = tfm.init_params(jax.random.PRNGKey(0), TINY, std=0.3)
    es_state, m, _ = _es_step(params, compute_dtype=jnp.bfloat16)
    _, (g_state, gm) = _grpo_step(params, compute_dtype=jnp.bfloat16)
    for st in (es_state, g_state):
        assert {x.dtype for x in jax.tree_util.tree_leaves(st.params)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(m["update_norm"]) and np.isfinite(gm["loss"])


def test_anchored_decay_maths():
    theta = {"w": jnp.array([1.0, -2.0, 4.0])}
    theta0 = {"w": jnp.array([0.0, 2.0, 4.0])}
    np.testing.assert_allclose(anchored(theta, theta0, 0.25)["w"], [0.75, -1.0, 4.0])
    np.testing.assert_array_equal(anchored(theta, theta0, 0.0)["w"], theta["w"])
    # in the fine-tuner: lr 0, so the step is the decay alone, from params != theta_0
    params0 = tfm.init_params(jax.random.PRNGKey(0), TINY, std=0.3)
    moved = jax.tree_util.tree_map(lambda x: x + 0.5, params0)
    task = custom_task(Counting(), PROMPTS)
    ft = es_finetuner(TINY, CharTokenizer(), task, optax.sgd(0.0), population=4, sigma=0.2, prompt_len=6,
                      max_new_tokens=4, anchor_decay=0.1)
    ctx = ft.setup(jax.random.PRNGKey(1), params0)
    new, m = ft.step(ctx, ft.init(ctx, moved), task.examples)
    for x, x0 in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(params0)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(x0) + 0.45, rtol=1e-6, atol=1e-6)
    n = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params0))
    assert m["drift_norm"] == pytest.approx(0.45 * np.sqrt(n), rel=1e-5)
    with pytest.raises(ValueError, match="anchor_decay"):
        es_finetuner(TINY, CharTokenizer(), task, optax.sgd(0.0), population=4, sigma=0.2, prompt_len=6,
                     max_new_tokens=4, anchor_decay=1.5)
