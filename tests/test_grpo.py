"""GRPO: advantages and loss against hand-computed values; a real update on a tiny transformer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eggroll.baselines import grpo


def test_group_advantages_hand_values():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    a = np.asarray(grpo.group_advantages(r, eps=0.0 + 1e-12))
    np.testing.assert_allclose(a[0], [1, -1, -1, 1], atol=1e-6)  # mean .5, std .5
    np.testing.assert_allclose(a[1], [0, 0, 0, 0])  # no signal
    std = math.sqrt((2.25**2 + 3 * 0.75**2) / 4)  # mean .75
    np.testing.assert_allclose(a[2], [2.25 / std, -0.75 / std, -0.75 / std, -0.75 / std], rtol=1e-5)
    with pytest.raises(ValueError, match="prompts, samples"):
        grpo.group_advantages(np.zeros(4))


def _hand_loss(logp, old, ref, mask, adv, eps, beta):
    total, n = 0.0, 0
    for i in range(len(logp)):
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            term = -min(ratio * adv[i], clipped * adv[i])
            d = ref[i][t] - logp[i][t]
            term += beta * (math.exp(d) - d - 1)
            total += term
            n += 1
    return total / n


def test_grpo_loss_hand_values():
    logp = [[-1.0, -0.5, -2.0], [-0.2, -3.0, -1.0]]
    old = [[-1.3, -0.5, -1.0], [-0.2, -2.5, -1.0]]
    ref = [[-1.1, -0.7, -1.5], [-0.4, -2.0, -0.9]]
    mask = [[1, 1, 0], [1, 1, 1]]
    adv = [1.5, -0.7]
    batch = grpo.GRPOBatch(None, None, jnp.array(mask, jnp.float32), jnp.array(adv),
                           jnp.array(old), jnp.array(ref))
    for beta in (0.0, 0.1):
        loss, m = grpo.grpo_loss(jnp.array(logp), batch, clip_eps=0.2, kl_coef=beta)
        assert float(loss) == pytest.approx(_hand_loss(logp, old, ref, mask, adv, 0.2, beta), rel=1e-5)
    # token 0 of row 0 has ratio e^0.3 = 1.35 > 1.2 (clipped); row 1 token 1 ratio e^-0.5 = 0.61 < 0.8
    assert float(m["clip_frac"]) == pytest.approx(2 / 5)
    # gradient wrt logp: zero where the clipped branch is active, -A*ratio/n elsewhere
    g = jax.grad(lambda lp: grpo.grpo_loss(lp, batch, clip_eps=0.2)[0])(jnp.array(logp))
    n = 5
    expect = np.zeros((2, 3))
    for i in range(2):
        for t in range(3):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped_active = (adv[i] > 0 and ratio > 1.2) or (adv[i] < 0 and ratio < 0.8)
            expect[i, t] = 0.0 if clipped_active else -adv[i] * ratio / n
    np.testing.assert_allclose(np.asarray(g), expect, rtol=1e-5, atol=1e-7)


def test_token_logprobs_and_build_batch():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 7))
    tokens = jnp.array([3, 1, 6, 2])
    want = [float(jax.nn.log_softmax(logits[t])[tokens[t + 1]]) for t in range(3)]
    np.testing.assert_allclose(np.asarray(grpo.token_logprobs(logits, tokens)), want, rtol=1e-6)
    b = grpo.build_batch([[0, 5, 6], [4, 5, 6]], [2, 3], [[7, 2, 0], [8, 9, 2]], [2, 3], [1.0, -1.0],
                         jnp.zeros((2, 3)))
    np.testing.assert_array_equal(b.positions, [[-1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(b.mask, [[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(b.tokens[0], [0, 5, 6, 7, 2, 0])


def test_grpo_update_moves_probability_towards_positive_advantage():
    from eggroll.models import transformer as tfm

    cfg = tfm.TransformerConfig(vocab_size=11, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                head_dim=8, intermediate_size=32)
    params = tfm.init_params(jax.random.PRNGKey(0), cfg)
    fn = grpo.transformer_logprob_fn(cfg)
    prompts = jnp.array([[0, 4, 5], [0, 4, 5], [6, 7, 8], [6, 7, 8]])
    comps = jnp.array([[3, 3, 2], [9, 2, 0], [1, 2, 0], [10, 10, 2]])
    adv = jnp.array([1.0, -1.0, -1.0, 1.0])
    b = grpo.build_batch(prompts, [2, 2, 3, 3], comps, [3, 2, 2, 3], adv, None)
    g1 = grpo.make_grpo(fn, optax.sgd(0.5), completion_len=3, kl_coef=0.05)
    old = g1.logprobs(params, b.tokens, b.positions)
    b = b._replace(old_logp=old, ref_logp=old)
    # the padded completion slot (mask 0) is excluded: same log-probs as the masked-out loss sees
    np.testing.assert_allclose(np.asarray(grpo.completion_logprobs(fn, params, b.tokens, b.positions, 3)),
                               np.asarray(old), rtol=1e-6)

    def objective(lp):  # token-mean sum of A * logp: what one small GRPO step increases
        return float((adv[:, None] * lp * b.mask).sum() / b.mask.sum())

    p1, _, m = g1.update(params, optax.sgd(0.5).init(params), b, jax.random.PRNGKey(1))
    new = g1.logprobs(p1, b.tokens, b.positions)
    assert objective(new) > objective(old) + 1e-4
    # ratio 1 and KL 0 at the first step: loss = -token-mean of A = -(3 - 2 - 2 + 3) / 10
    assert float(m["loss"]) == pytest.approx(-0.2, abs=1e-6) and float(m["kl"]) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="minibatches"):
        grpo.make_grpo(fn, optax.sgd(0.1), completion_len=3, minibatches=3).update(
            params, optax.sgd(0.1).init(params), b, jax.random.PRNGKey(0))


@pytest.mark.slow
def test_grpo_minibatch_epochs_improve_objective():
    from eggroll.models import transformer as tfm

    cfg = tfm.TransformerConfig(vocab_size=11, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                head_dim=8, intermediate_size=32)
    params = tfm.init_params(jax.random.PRNGKey(0), cfg)
    fn = grpo.transformer_logprob_fn(cfg)
    adv = jnp.array([1.0, -1.0, -1.0, 1.0])
    b = grpo.build_batch(jnp.array([[0, 4, 5], [0, 4, 5], [6, 7, 8], [6, 7, 8]]), [2, 2, 3, 3],
                         jnp.array([[3, 3, 2], [9, 2, 0], [1, 2, 0], [10, 10, 2]]), [3, 2, 2, 3], adv, None)
    g = grpo.make_grpo(fn, optax.adam(1e-2), completion_len=3, minibatches=2, epochs=2, kl_coef=0.05)
    old = g.logprobs(params, b.tokens, b.positions)
    b = b._replace(old_logp=old, ref_logp=old)
    p2, _, m = g.update(params, optax.adam(1e-2).init(params), b, jax.random.PRNGKey(1))
    new = g.logprobs(p2, b.tokens, b.positions)
    gain = float((adv[:, None] * (new - old) * b.mask).sum())
    assert gain > 0 and all(np.isfinite(float(v)) for v in m.values())


def test_data_parallel_update_matches_one_device_update():
    """Rows split over the 4 devices, gradients and token counts psum'd: the same step as make_grpo's."""
    from jax.sharding import NamedSharding, PartitionSpec

    from eggroll.models import transformer as tfm
    from eggroll.population import AXIS, population_mesh

    cfg = tfm.TransformerConfig(vocab_size=11, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                head_dim=8, intermediate_size=32)
    params = tfm.init_params(jax.random.PRNGKey(0), cfg)
    fn = grpo.transformer_logprob_fn(cfg)
    prompts = jnp.array([[0, 4, 5], [0, 4, 5], [6, 7, 8], [6, 7, 8]] * 2)
    comps = jnp.array([[3, 3, 2], [9, 2, 0], [1, 2, 0], [10, 10, 2]] * 2)
    adv = jnp.array([1.0, -1.0, -1.0, 1.0, 0.5, -0.5, 2.0, -2.0])
    b = grpo.build_batch(prompts, [2, 2, 3, 3] * 2, comps, [3, 2, 1, 3, 3, 1, 2, 3], adv, None)
    one = grpo.make_grpo(fn, optax.adam(1e-2), completion_len=3, kl_coef=0.05)
    old = one.logprobs(params, b.tokens, b.positions)
    b = b._replace(old_logp=old + 0.1 * jnp.sin(jnp.arange(old.size).reshape(old.shape)), ref_logp=old)
    p1, _, m1 = one.update(params, optax.adam(1e-2).init(params), b, jax.random.PRNGKey(1))
    mesh = population_mesh()
    assert mesh.size == 4
    dp = grpo.data_parallel_update(fn, optax.adam(1e-2), 3, mesh, kl_coef=0.05)
    sharded = jax.device_put(b, NamedSharding(mesh, PartitionSpec(AXIS)))
    p2, _, m2 = dp(params, optax.adam(1e-2).init(params), sharded, jax.random.PRNGKey(1))
    for k in ("loss", "kl", "clip_frac", "ratio_mean", "grad_norm"):
        assert float(m2[k]) == pytest.approx(float(m1[k]), rel=1e-5, abs=1e-7), k
    for x, y in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
