"""PPO (eggroll.baselines.ppo): resets only where needed, CleanRL's defaults (annealed learning
rate, clipped value loss, orthogonal init), observation statistics, and that it learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eggroll.baselines import ppo
from eggroll.recipes import rl as recipe
from eggroll.runlog import read_metrics
from eggroll.tasks import rl
from test_rl_fixes import counting_env

E, T = 4, 7  # E: a multiple of the test process's device count (PPO splits its environments)


def _hp(**kw):
    return {**recipe.DEFAULTS, "hidden": (8,), "num_envs": E, "rollout_len": T, "minibatches": 1, "ppo_epochs": 1, **kw}


def _one_update(env, **kw):
    trainer = ppo.make_ppo_trainer(env, _hp(**kw), eval_episodes=1)
    state = trainer.init(0)
    return trainer, state, trainer.step(state)


def test_auto_reset_envs_are_not_reset_again():
    """An env that restarts itself at done: PPO's rollout calls reset on no step (it used to
    reset every environment on every step and overwrite the env's own restart)."""
    calls = {}
    env = counting_env(length=3, auto_reset=True, calls=calls)
    trainer = ppo.make_ppo_trainer(env, _hp(), eval_episodes=1)
    state = trainer.init(0)
    calls.clear()
    after, m = trainer.step(state)
    jax.block_until_ready(m)
    assert calls.get("reset", 0) == 0, calls
    episodes = np.asarray(after.env_state[1])
    np.testing.assert_array_equal(episodes, [T // 3] * E)  # the env's own count of restarts goes on
    assert int(m["episodes_done"]) == E * (T // 3) and float(m["train_return"]) == 3.0


def test_envs_without_auto_reset_are_reset_at_done_and_horizon_cuts_too():
    calls = {}
    env = counting_env(length=3, auto_reset=False, calls=calls)  # brax-like: NaN rewards past done
    trainer = ppo.make_ppo_trainer(env, _hp(), eval_episodes=1)
    state = trainer.init(0)
    calls.clear()
    after, m = trainer.step(state)
    jax.block_until_ready(m)
    D = jax.device_count()  # every device runs its own environments' resets
    assert calls["reset"] == D * (T // 3)  # the steps where some environment ended
    assert np.isfinite(float(m["train_return"])) and float(m["train_return"]) == 3.0
    np.testing.assert_array_equal(np.asarray(after.t), [T % 3] * E)
    cut = counting_env(length=100, horizon=2, auto_reset=True, calls=calls)  # the horizon cuts the episode
    trainer = ppo.make_ppo_trainer(cut, _hp(), eval_episodes=1)
    state = trainer.init(0)
    calls.clear()
    after, m = trainer.step(state)
    jax.block_until_ready(m)
    assert calls["reset"] == D * (T // 2) and int(m["episodes_done"]) == E * (T // 2)


def test_clipped_value_loss():
    env = counting_env()
    hp = _hp(clip_eps=0.2, ent_coef=0.0)
    c = ppo._Setup(env, hp, rl.policy_sizes(env, (8,)), None, 1, E, E)
    params = ppo._init(c._replace(tx=ppo.optax.adam(1e-3)), 0).params
    last = params["critic"]["layers"][-1]
    params["critic"]["layers"][-1] = {"w": jnp.zeros_like(last["w"]), "b": jnp.full_like(last["b"], 0.5)}  # V = 0.5
    n = 4
    b = {"obs": jnp.ones((n, 2)), "legal": jnp.ones((n, 2), bool), "action": jnp.zeros((n,), jnp.int32),
         "logp": jnp.full((n,), -np.log(2.0)), "value": jnp.zeros((n,)), "adv": jnp.ones((n,)), "ret": jnp.ones((n,))}
    stats = (jnp.float32(0.0), jnp.float32(1.0))
    vf = lambda clip: float(ppo._loss(c._replace(hp={**hp, "clip_vloss": clip}), params, b, stats, jnp.mean)[1][1])
    # unclipped 0.5 (0.5 - 1)^2; clipped: V_old + clip(0.5 - 0, +-0.2) = 0.2 -> 0.5 max(0.25, 0.64)
    assert vf(False) == pytest.approx(0.125) and vf(True) == pytest.approx(0.32)


def test_actor_and_critic_gradients_are_clipped_separately():
    """A critic gradient of norm 100 leaves an actor gradient of norm 0.3 whole (a joint clip to
    0.5 would scale it by 1/200); each part over the limit comes back at norm 0.5."""
    grads = {"actor": {"w": jnp.array([0.3, 0.0])}, "log_std": jnp.array([0.0]),
             "critic": {"w": jnp.array([60.0, 80.0])}}
    clip = ppo.clip_actor_and_critic(0.5)
    out, _ = clip.update(grads, clip.init(grads))
    np.testing.assert_allclose(out["actor"]["w"], [0.3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["critic"]["w"], [0.3, 0.4], rtol=1e-6)
    big = {**grads, "actor": {"w": jnp.array([3.0, 4.0])}, "log_std": jnp.array([0.0])}
    out, _ = clip.update(big, clip.init(big))
    np.testing.assert_allclose(out["actor"]["w"], [0.3, 0.4], rtol=1e-6)
    joint, _ = optax.clip_by_global_norm(0.5).update(grads, optax.EmptyState())
    assert float(joint["actor"]["w"][0]) < 0.3 / 100  # what the joint clip did


def test_orthogonal_init():
    p = ppo.init_orthogonal(jax.random.PRNGKey(0), (3, 16, 16, 2), 0.01)
    w = [np.asarray(layer["w"], np.float64) for layer in p["layers"]]
    np.testing.assert_allclose(w[0].T @ w[0], 2.0 * np.eye(3), atol=1e-5)  # (16, 3): orthonormal columns
    np.testing.assert_allclose(w[1] @ w[1].T, 2.0 * np.eye(16), atol=1e-5)
    np.testing.assert_allclose(w[2] @ w[2].T, 1e-4 * np.eye(2), atol=1e-8)
    assert all(np.all(np.asarray(layer["b"]) == 0) for layer in p["layers"])


def test_learning_rate_anneals_linearly_over_the_budget():
    env = counting_env(length=3, auto_reset=True)
    budget = 5 * E * T
    for anneal in (True, False):
        trainer = ppo.make_ppo_trainer(env, _hp(anneal_lr=anneal, ppo_lr=1e-3), 1, budget_steps=budget)
        state, lrs = trainer.init(0), []
        for _ in range(5):
            state, m = trainer.step(state)
            lrs.append(float(m["lr"]))
        want = [1e-3 * (1 - g / 5) for g in range(5)] if anneal else [1e-3] * 5
        np.testing.assert_allclose(lrs, want, rtol=1e-5)


def test_obs_stats_from_the_rollouts():
    """After one update: the statistics of every observation the policy acted on (synchronised
    3-step episodes: t = k mod 3 at step k, in every environment)."""
    env = counting_env(length=3, auto_reset=True)
    _, _, (after, _) = _one_update(env, obs_norm=True)
    t = np.tile(np.arange(T) % 3, E).astype(np.float64)
    obs = np.stack([t, t * t], 1)
    assert float(after.obs_stats.count) == E * T
    np.testing.assert_allclose(np.asarray(after.obs_stats.mean), obs.mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(after.obs_stats.var), obs.var(0), rtol=1e-5)
    _, _, (plain, _) = _one_update(env)
    assert float(plain.obs_stats.count) == 0.0


def bandit(arms=4, length=8):
    """A contextual bandit: the obs is a one-hot context, reward 1 for the action equal to it."""
    def draw(key):
        c = jax.random.randint(key, (), 0, arms)
        return c, jax.nn.one_hot(c, arms)[None]

    def reset(key):
        (c, obs) = draw(key)
        return (c, jnp.int32(0)), rl.Step(obs, jnp.zeros((1,)), jnp.asarray(False), jnp.ones((1, arms), bool))

    def step(key, state, action):
        c, t = state
        reward = (action[0] == c).astype(jnp.float32)
        c, obs = draw(key)
        t = t + 1
        done = t >= length
        return (c, jnp.where(done, 0, t)), rl.Step(obs, reward[None], done, jnp.ones((1, arms), bool))

    return rl.Env("bandit", "test", arms, arms, True, 1, length, reset, step, True)


def test_ppo_learns_a_contextual_bandit():
    env = bandit()
    hp = _hp(hidden=(16,), num_envs=8, rollout_len=16, minibatches=2, ppo_epochs=4, ppo_lr=3e-3)
    trainer = ppo.make_ppo_trainer(env, hp, eval_episodes=16, budget_steps=40 * 8 * 16)
    state = trainer.init(0)
    first = float(np.mean(trainer.evaluate(state, jax.random.PRNGKey(1))))
    for _ in range(40):
        state, m = trainer.step(state)
    final = float(np.mean(trainer.evaluate(state, jax.random.PRNGKey(1))))
    assert first < 0.6 * 8 and final >= 0.95 * 8, (first, final)


def test_ppo_learns_cartpole(tmp_path):
    """The stochastic policy's episode return (train_return) rises well above the first updates'."""
    cfg = recipe.Config(env="CartPole-v1", strategy="ppo", budget_steps=40_000, hidden="32,32", num_envs=8,
                        rollout_len=64, eval_every=20, eval_episodes=4, max_steps=500, progress=False,
                        run_dir=str(tmp_path))
    recipe.run(cfg)
    ret = [r["train_return"] for r in read_metrics(tmp_path / "seed0") if r.get("train_return") is not None]
    assert np.mean(ret[-20:]) > 3 * np.mean(ret[:3]) and np.mean(ret[-20:]) > 100, ret
