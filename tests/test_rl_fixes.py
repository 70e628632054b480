"""The RL harness fixes of issue 13: learning-rate decay over the budget in force, OpenES's own
presets, rollouts that stop when every episode is done (same results), returns immune to NaN
rewards after done, antithetic pairs sharing episodes, bad-input errors, observation
normalisation (statistics vs numpy, ES and PPO) and exact --resume with the new state.

Fake environments here (`counting_env`) are also used by test_ppo.py."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from eggroll import cli
from eggroll.models.mlp import init_mlp
from eggroll.recipes import rl as recipe
from eggroll.runlog import read_metrics
from eggroll.strategy import eggroll as make_eggroll
from eggroll.tasks import rl


def callback_counter(calls: dict, name: str):
    """x -> 0.0 that counts, in calls[name], how often the compiled program runs it (a batched
    call counts once)."""
    def host(x):
        calls[name] = calls.get(name, 0) + 1
        return np.zeros(np.shape(x), np.float32)

    return lambda x: jax.pure_callback(host, jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32), x,
                                       vmap_method="broadcast_all")


def counting_env(length=3, horizon=1000, auto_reset=False, calls=None, random_length=False):
    """Episodes of `length` steps (random_length: 2..6, drawn at reset), reward 1 per step, obs
    [t, t^2] (t: steps into the episode). Without auto_reset, stepping past done keeps done and
    gives NaN rewards (like brax and jumanji, which keep stepping a finished episode).
    state = (t, episodes finished, this episode's length)."""
    calls = {} if calls is None else calls
    tick_step, tick_reset = callback_counter(calls, "step"), callback_counter(calls, "reset")

    def obs_of(t, z):
        t = t.astype(jnp.float32)
        return jnp.stack([t, t * t])[None] + z

    def first(key, episodes, z):
        end = jax.random.randint(key, (), 2, 7) if random_length else jnp.int32(length)
        return (jnp.int32(0), episodes, end), obs_of(jnp.int32(0), z)

    def reset(key):
        state, obs = first(key, jnp.int32(0), tick_reset(jax.random.uniform(key)))
        return state, rl.Step(obs, jnp.zeros((1,)), jnp.asarray(False), jnp.ones((1, 2), bool))

    def step(key, state, action):
        t, episodes, end = state
        z = tick_step(t.astype(jnp.float32))  # (an input that varies: not hoisted out of loops)
        t = t + 1
        done = t >= end
        reward = jnp.where(t > end, jnp.nan, 1.0) + z
        state, obs = (t, episodes, end), obs_of(t, z)
        if auto_reset:
            restart, obs0 = first(key, episodes + 1, z)
            state = jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), restart, state)
            obs = jnp.where(done, obs0, obs)
        return state, rl.Step(obs, jnp.full((1,), reward), done, jnp.ones((1, 2), bool))

    return rl.Env("counting", "test", 2, 2, True, 1, horizon, reset, step, auto_reset)


def zero_policy(env):
    return init_mlp(jax.random.PRNGKey(0), rl.policy_sizes(env, (4,)))


def scan_episode(env, apply, key):
    """The former rollout (a scan over the whole horizon, steps after done masked by a product)."""
    k_reset, k_step = jax.random.split(key)
    state, ts = env.reset(k_reset)

    def body(carry, t):
        state, ts, alive, ret, length = carry
        action = rl.act(env, apply(ts.obs), ts.legal)
        state, ts = env.step(jax.random.fold_in(k_step, t), state, action)
        ret = ret + alive * ts.reward.mean()
        length = length + alive.astype(jnp.int32)
        return (state, ts, alive * (1.0 - ts.done.astype(jnp.float32)), ret, length), None

    carry = (state, ts, jnp.float32(1.0), jnp.float32(0.0), jnp.int32(0))
    (_, _, _, ret, length), _ = lax.scan(body, carry, jnp.arange(env.horizon))
    return ret, length


# ------------------------------------------------------------------ 3, 5: rollouts

@pytest.mark.parametrize("name", ["CartPole-v1", "Pendulum-v1"])
def test_rollout_equals_the_full_horizon_scan(name):
    """Same returns and env steps, bit for bit, as the former full-horizon scan (Pendulum never
    ends early; CartPole does)."""
    env = rl.make_env(name, max_steps=80)
    p = init_mlp(jax.random.PRNGKey(0), rl.policy_sizes(env, (8,)))
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    want = jax.jit(jax.vmap(lambda k: scan_episode(env, rl.mlp_apply(p), k)))(keys)
    got = jax.jit(jax.vmap(lambda k: rl.episode(env, rl.mlp_apply(p), k)))(keys)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_rollouts_stop_when_every_episode_is_done():
    """A batch of 3-step episodes with a 1000-step horizon runs 3 batched env steps, not 1000."""
    calls = {}
    env = counting_env(length=3, horizon=1000, calls=calls)
    p = zero_policy(env)
    f = jax.jit(lambda keys: rl.member_episodes(env, p, None, keys))
    ret, length = f(jax.random.split(jax.random.PRNGKey(0), 4))
    np.testing.assert_array_equal(np.asarray(length), [3] * 4)
    assert calls["step"] == 3, calls


def test_nan_reward_after_done_does_not_reach_the_return():
    """Episodes of different lengths in one batch: the finished ones keep stepping (NaN rewards)
    while the others run on; every return is its episode's length, and finite."""
    env = counting_env(horizon=10, random_length=True)
    keys = jax.random.split(jax.random.PRNGKey(0), 16)
    ret, length = jax.jit(lambda ks: rl.member_episodes(env, zero_policy(env), None, ks))(keys)
    assert len(set(np.asarray(length).tolist())) > 1
    np.testing.assert_array_equal(np.asarray(ret), np.asarray(length).astype(np.float32))
    old = jax.jit(jax.vmap(lambda k: scan_episode(env, rl.mlp_apply(zero_policy(env)), k)))(keys)
    assert not np.isfinite(np.asarray(old[0])).all()  # the former product masking: 0 * NaN = NaN


def test_antithetic_pairs_share_episodes_without_common_random_numbers():
    env = rl.make_env("CartPole-v1", max_steps=60)
    es = make_eggroll(8, 1e-6, 1)  # ~zero noise: a pair's two members play the same episodes alike
    params = init_mlp(jax.random.PRNGKey(0), rl.policy_sizes(env, (8,)))
    ctx = es.setup(jax.random.PRNGKey(1), params)
    state = es.init(ctx)
    _, steps = jax.jit(lambda k: rl.population_fitness(env, es, ctx, state, params, k, episodes=2,
                                                       common_random_numbers=False))(jax.random.PRNGKey(3))
    steps = np.asarray(steps)
    np.testing.assert_array_equal(steps[0::2], steps[1::2])
    assert len(set(steps[0::2].tolist())) > 1  # the pairs themselves get different episodes


# ------------------------------------------------------------------ 1, 2: schedules and presets

BASE = dict(env="CartPole-v1", hidden="8", population=8, eval_every=50, eval_episodes=2, max_steps=200,
            progress=False, lr=0.1, lr_decay=0.5)


def test_lr_decays_over_the_env_steps_actually_spent(tmp_path):
    """Early termination: the decay follows the env steps counted, reaching lr * lr_decay at the
    end of the step budget (the former schedule assumed full-length episodes)."""
    budget = 3000
    recipe.run(recipe.Config(budget_steps=budget, run_dir=str(tmp_path), **BASE))
    recs = [r for r in read_metrics(tmp_path / "seed0") if "lr" in r]
    steps_before = [0] + [r["env_steps"] for r in recs[:-1]]
    want = [0.1 * (1 - 0.5 * min(1.0, s / budget)) for s in steps_before]
    np.testing.assert_allclose([r["lr"] for r in recs], want, rtol=1e-5)
    assert recs[-1]["lr"] < 0.1 * (1 - 0.5 * 0.8)  # nearly fully decayed when the budget ran out


def test_lr_decays_over_a_wall_clock_budget(tmp_path):
    """budget_steps huge, budget_wall_s in force: the decay follows the training wall clock."""
    recipe.run(recipe.Config(budget_steps=10**9, budget_wall_s=2.0, run_dir=str(tmp_path), **BASE))
    recs = [r for r in read_metrics(tmp_path / "seed0") if "lr" in r]
    lrs = [r["lr"] for r in recs]
    assert lrs[0] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] < 0.1 * (1 - 0.5 * 0.5), lrs[-5:]


def test_open_es_has_its_own_presets():
    ref = {s: recipe.resolve(recipe.Config(env="MPE_simple_reference_v3", strategy=s)) for s in ("eggroll", "open_es")}
    assert (ref["open_es"]["sigma"], ref["open_es"]["activation"], ref["open_es"]["shaping"]) == (0.3, "tanh",
                                                                                                  "centered_rank")
    assert (ref["eggroll"]["sigma"], ref["eggroll"]["activation"], ref["eggroll"]["shaping"]) == (0.1, "pqn", "z_score")
    assert ref["open_es"]["population"] == ref["eggroll"]["population"]  # fields it does not name: the "es" entry
    sl = {s: recipe.resolve(recipe.Config(env="mpe/simple_speaker_listener_v4", strategy=s)) for s in ("eggroll",
                                                                                                      "open_es")}
    assert (sl["eggroll"]["lr_decay"], sl["open_es"]["lr_decay"]) == (0.7, 0.3)
    assert recipe.resolve(recipe.Config(env="MPE_simple_reference_v3", strategy="open_es", sigma=0.2))["sigma"] == 0.2


def test_tuned_presets_sit_between_the_hand_presets_and_the_flags(tmp_path, monkeypatch):
    """tune --record writes the best trial as TUNED[env][method]; resolve layers it over PRESETS
    (that method only), flags over it; obs_norm, a `bool | None` switch, follows the preset until
    --obs-norm / --no-obs-norm is given."""
    from eggroll import tune
    from eggroll.recipes import rl_presets

    path = tmp_path / "rl_tuned.json"
    monkeypatch.setattr(rl_presets, "TUNED_PATH", path)
    monkeypatch.setattr(rl_presets, "TUNED", {})
    cfg = tune.Config(env="Pendulum-v1", strategy="open_es", trials=3, budget_steps=1000, space='{"sigma": [0.3]}')
    best = {"sigma": 0.3, "lr": 0.05, "obs_norm": True, "population": 32}
    table = tune.record(cfg, {"best": best, "best_score": -300.0, "best_stderr": 0.0, "trials": 3})
    assert json.loads(path.read_text()) == table == rl_presets.TUNED
    entry = table["Pendulum-v1"]["open_es"]
    assert entry["hp"] == best and entry["score"] == -300.0
    assert entry["search"].startswith("eggroll tune --env Pendulum-v1 --strategy open_es --trials 3") and \
        "--space '{\"sigma\": [0.3]}'" in entry["search"]
    hand = rl_presets.PRESETS["Pendulum-v1"]["es"]
    oe = recipe.resolve(recipe.Config(env="Pendulum-v1", strategy="open_es"))
    eg = recipe.resolve(recipe.Config(env="Pendulum-v1", strategy="eggroll"))
    assert (oe["sigma"], oe["lr"], oe["obs_norm"], oe["population"]) == (0.3, 0.05, True, 32)
    assert oe["max_steps"] == hand["max_steps"]  # a field the search did not sample: the hand preset
    assert (eg["sigma"], eg["lr"], eg["obs_norm"]) == (hand["sigma"], hand["lr"], False)  # the other method: untouched
    flags = recipe.resolve(recipe.Config(env="Pendulum-v1", strategy="open_es", sigma=0.1, obs_norm=False))
    assert (flags["sigma"], flags["obs_norm"], flags["lr"]) == (0.1, False, 0.05)
    table = tune.record(dataclasses.replace(cfg, strategy="ppo"), {"best": {"ppo_lr": 1e-4}, "best_score": -200.0,
                                                                      "best_stderr": 1.0, "trials": 3})
    assert set(table["Pendulum-v1"]) == {"open_es", "ppo"}  # one entry per method, the others kept
    assert recipe.resolve(recipe.Config(env="Pendulum-v1", strategy="ppo"))["ppo_lr"] == 1e-4


def test_optional_switches_parse_to_none_true_false():
    import argparse

    from eggroll.config import add_dataclass_flags, parse_into

    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, recipe.Config)
    got = [parse_into(recipe.Config, parser.parse_args(a)).obs_norm for a in ([], ["--obs-norm"], ["--no-obs-norm"])]
    assert got == [None, True, False]


# ------------------------------------------------------------------ 8: bad input

def _one_line_error(capsys, argv, *words):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_unknown_suite_name_is_a_one_line_error(capsys, monkeypatch):
    def registry_lookup(name, max_steps):  # what brax.envs.get_environment does for an unknown name
        raise KeyError(name)

    monkeypatch.setitem(rl.SUITES, "brax", registry_lookup)
    with pytest.raises(ValueError, match="no_such_robot"):
        rl.make_env("brax/no_such_robot")
    _one_line_error(capsys, ["train", "rl", "--env", "brax/no_such_robot", "--no-progress"], "no_such_robot")


def test_unknown_brax_env_lists_the_names(capsys):
    pytest.importorskip("brax")
    _one_line_error(capsys, ["train", "rl", "--env", "brax/no_such_robot", "--no-progress"], "no_such_robot", "hopper")


def test_flags_of_the_other_method_are_refused(capsys):
    _one_line_error(capsys, ["train", "rl", "--strategy", "ppo", "--population", "0", "--no-progress"],
                    "--population", "ppo")
    _one_line_error(capsys, ["train", "rl", "--strategy", "eggroll", "--num-envs", "8", "--no-progress"],
                    "--num-envs", "eggroll")


# ------------------------------------------------------------------ observation normalisation

def test_obs_stats_match_numpy_on_a_stream():
    """Moments about the running mean: only the first chunk (about 0) loses float32 digits, as
    (mean / std)^2 * 1e-7; later chunks keep their precision however large the mean."""
    rng = np.random.default_rng(0)
    chunks = [rng.normal(50.0, 2.0, size=(n, 3)).astype(np.float32) for n in (5, 1, 0, 40, 17)]
    stats = rl.obs_stats_init(3)
    merge = jax.jit(lambda st, x: rl.merge_obs_moments(st, x.shape[0], (x - st.mean).sum(0),
                                                       ((x - st.mean) ** 2).sum(0)))
    for x in chunks:
        stats = merge(stats, jnp.asarray(x))
    allx = np.concatenate(chunks).astype(np.float64)
    assert float(stats.count) == len(allx)
    np.testing.assert_allclose(np.asarray(stats.mean), allx.mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats.var), allx.var(0), rtol=1e-4)
    z = np.asarray(rl.normalize_obs(stats, jnp.asarray(allx, jnp.float32)))
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-2)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-2)


def test_es_generation_updates_obs_stats_from_every_member():
    """One ES generation on 4-step episodes: the statistics are those of every observation the
    population acted on (t = 0..3 for each member and episode)."""
    env = counting_env(length=4, horizon=50)
    hp = {**recipe.DEFAULTS, "hidden": (4,), "population": 4, "episodes": 2, "obs_norm": True}
    trainer = recipe.make_es_trainer(env, "eggroll", hp, budget_steps=10**6)
    state = trainer.init(0)
    state, m = trainer.step(state, trainer.context(0))
    t = np.tile(np.arange(4.0), 4 * 2)
    obs = np.stack([t, t * t], 1)
    assert int(m["env_steps"]) == len(t) and float(state.obs_stats.count) == len(t)
    np.testing.assert_allclose(np.asarray(state.obs_stats.mean), obs.mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.obs_stats.var), obs.var(0), rtol=1e-5)
    off = recipe.make_es_trainer(env, "eggroll", {**hp, "obs_norm": False}, budget_steps=10**6)
    s_off, _ = off.step(off.init(0), off.context(0))
    assert float(s_off.obs_stats.count) == 0.0  # off: untouched


# ------------------------------------------------------------------ resume with the new state

def _interrupt_after(monkeypatch, calls_before_raise: int):
    """recipe.make_trainer whose step raises on its n-th call (warm-up's two calls included)."""
    real = recipe.make_trainer

    def make(cfg, hp=None):
        t = real(cfg, hp)
        n = {"calls": 0}

        def step(s, ctx=None):
            n["calls"] += 1
            if n["calls"] == calls_before_raise:
                raise KeyboardInterrupt("killed")
            return t.step(s, ctx)

        return t._replace(step=step)

    monkeypatch.setattr(recipe, "make_trainer", make)


@pytest.mark.slow  # 15-18 s each; tests/test_rl.py's resume test covers both methods by default
@pytest.mark.parametrize("strategy", ["eggroll", "ppo"])
def test_interrupted_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, strategy):
    """obs_norm on, learning rate decaying: killed in generation 3 (checkpoint at 2), --resume
    reaches generation 4 with the whole state (params, optimizer, ES / PPO state, observation
    statistics, budget progress, keys) bitwise equal to a run never interrupted."""
    from safetensors.numpy import load_file

    own = dict(num_envs=4, rollout_len=8, minibatches=2) if strategy == "ppo" else dict(population=8, lr_decay=0.5)
    kw = dict(env="CartPole-v1", strategy=strategy, generations=4, budget_steps=10_000, hidden="8", eval_every=2,
              eval_episodes=2, max_steps=30, checkpoint_every=2, obs_norm=True, progress=False, **own)
    ref = recipe.run(recipe.Config(run_dir=str(tmp_path / "ref"), **kw))
    with monkeypatch.context() as m:
        _interrupt_after(m, 2 + 3)
        with pytest.raises(KeyboardInterrupt):
            recipe.run(recipe.Config(run_dir=str(tmp_path / "run"), **kw))
    meta = json.loads((tmp_path / "run" / "seed0" / "checkpoint" / "meta.json").read_text())
    assert meta["metadata"]["generation"] == 2
    res = recipe.run(recipe.Config(run_dir=str(tmp_path / "run"), resume=True, **kw))
    assert res["per_seed"][0]["generations"] == 4 and res["mean_return"] == ref["mean_return"]
    want = load_file(str(tmp_path / "ref" / "seed0" / "checkpoint" / "arrays.safetensors"))
    got = load_file(str(tmp_path / "run" / "seed0" / "checkpoint" / "arrays.safetensors"))
    assert sorted(want) == sorted(got) and len(want) > 0
    for k in want:
        np.testing.assert_array_equal(want[k], got[k], err_msg=k)
    assert {".obs_stats.count", ".obs_stats.mean", ".obs_stats.var", ".progress"} <= set(got)
    assert float(got[".obs_stats.count"]) > 0 and float(got[".progress"].max()) > 0
