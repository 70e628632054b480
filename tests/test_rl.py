"""RL adapters (gymnax), rollouts, population fitness, PPO maths, loop-weighted communication
(distributed.loop_collective_bytes, which PPO's update accounting needs) and the `rl` recipe / bench.

Other suites (brax, jumanji, navix, craftax, MPE) are in test_rl_suites.py and skip when absent."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eggroll import cli
from eggroll.baselines.ppo import gae
from eggroll.models.mlp import init_mlp
from eggroll.recipes import rl as recipe
from eggroll.runlog import read_metrics
from eggroll.strategy import eggroll as make_eggroll
from eggroll.tasks import rl


@pytest.fixture(scope="module")
def cartpole():
    return rl.make_env("CartPole-v1", max_steps=60)


@pytest.fixture(scope="module")
def fitness_fn(cartpole):
    """Jitted population fitness of a tiny policy; shared by the tests below (one compile)."""
    es = make_eggroll(8, 0.5, 1)
    params = init_mlp(jax.random.PRNGKey(0), rl.policy_sizes(cartpole, (8,)))
    ctx = es.setup(jax.random.PRNGKey(1), params)
    state = es.init(ctx)

    @jax.jit
    def f(key):
        return rl.population_fitness(cartpole, es, ctx, state, params, key, episodes=2)

    @jax.jit
    def one(member, key):  # member alone, outside the population
        ret, length = rl.member_episodes(cartpole, params, es.noise(ctx, state, member), jax.random.split(key, 2))
        return ret.mean(), length.sum()

    return f, one


def test_gymnax_shapes(cartpole):
    assert (cartpole.suite, cartpole.obs_size, cartpole.num_outputs, cartpole.discrete) == ("gymnax", 4, 2, True)
    assert cartpole.num_agents == 1 and cartpole.horizon == 60
    state, ts = cartpole.reset(jax.random.PRNGKey(0))
    assert ts.obs.shape == (1, 4) and ts.obs.dtype == jnp.float32
    assert ts.reward.shape == (1,) and ts.done.shape == () and ts.legal.shape == (1, 2)
    state, ts = cartpole.step(jax.random.PRNGKey(1), state, jnp.zeros((1,), jnp.int32))
    assert ts.obs.shape == (1, 4) and float(ts.reward[0]) == 1.0


def test_continuous_action_rescaled_to_bounds():
    env = rl.make_env("Pendulum-v1", max_steps=5)
    assert not env.discrete and env.num_outputs == 1 and env.obs_size == 3
    to_env = rl._box_action(-2.0, 2.0, (1,))
    np.testing.assert_allclose(to_env(jnp.array([-1.0])), [-2.0])
    np.testing.assert_allclose(to_env(jnp.array([1.0])), [2.0])
    np.testing.assert_allclose(to_env(jnp.array([0.25])), [0.5])
    np.testing.assert_allclose(to_env(jnp.array([7.0])), [2.0])  # clipped
    p = init_mlp(jax.random.PRNGKey(0), rl.policy_sizes(env, (8,)))
    r = jax.jit(lambda k: rl.evaluate_policy(env, p, k, 2))(jax.random.PRNGKey(0))
    assert r.shape == (2,) and np.all(np.isfinite(r)) and np.all(r < 0)


def test_one_hot_obs_matches_brute_force():
    x = np.array([[0, 3], [5, 1]])
    got = np.asarray(rl.one_hot_obs(x, 4))
    want = np.zeros((4, 4))
    for i, v in enumerate(x.reshape(-1)):
        want[i, min(v, 3)] = 1.0  # 5 is clipped to the last class
    np.testing.assert_array_equal(got, want.reshape(-1))


def test_deterministic_action_respects_legal_mask(cartpole):
    out = jnp.array([[5.0, 1.0]])
    assert int(rl.act(cartpole, out, jnp.array([[True, True]]))[0]) == 0
    assert int(rl.act(cartpole, out, jnp.array([[False, True]]))[0]) == 1


def test_episode_masks_steps_after_done(cartpole):
    """Return == length for CartPole (reward 1 per step) and the early-failing policy stops counting."""
    p = init_mlp(jax.random.PRNGKey(2), rl.policy_sizes(cartpole, (8,)))
    ret, length = jax.jit(lambda k: rl.episode(cartpole, rl.mlp_apply(p), k))(jax.random.PRNGKey(3))
    assert 0 < int(length) < 60 and float(ret) == int(length)


def test_fitness_deterministic_for_fixed_seed(fitness_fn):
    f, _ = fitness_fn
    a, b = f(jax.random.PRNGKey(5)), f(jax.random.PRNGKey(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (8,) and np.ptp(np.asarray(a[0])) > 0  # members differ (their noise)


def test_members_independent(fitness_fn):
    """Each member's fitness in the population equals that member evaluated on its own."""
    f, one = fitness_fn
    key = jax.random.PRNGKey(7)
    fit, steps = f(key)
    for m in (0, 3, 6):
        r, n = one(m, key)
        np.testing.assert_allclose(float(r), float(fit[m]), rtol=1e-6)
        assert int(n) == int(steps[m])


def test_no_common_random_numbers_gives_members_their_own_episodes(cartpole):
    es = make_eggroll(4, 1e-6, 1)  # ~zero noise: differences come from the start states only
    params = init_mlp(jax.random.PRNGKey(0), rl.policy_sizes(cartpole, (8,)))
    ctx = es.setup(jax.random.PRNGKey(1), params)
    state = es.init(ctx)
    f = jax.jit(lambda k, crn: rl.population_fitness(cartpole, es, ctx, state, params, k, common_random_numbers=crn),
                static_argnums=1)
    same = np.asarray(f(jax.random.PRNGKey(0), True)[1])
    diff = np.asarray(f(jax.random.PRNGKey(0), False)[1])
    assert len(set(same.tolist())) == 1 and len(set(diff.tolist())) > 1


def test_bad_names_and_missing_suite(monkeypatch):
    with pytest.raises(ValueError, match="not in the gymnax registry"):
        rl.make_env("NoSuchEnv-v0")
    with pytest.raises(ValueError, match="max_steps"):
        rl.make_env("CartPole-v1", max_steps=0)
    real = rl.importlib.import_module

    def fake(name, *a):
        if name.startswith("brax"):
            raise ModuleNotFoundError("No module named 'brax'")
        return real(name, *a)

    monkeypatch.setattr(rl.importlib, "import_module", fake)
    with pytest.raises(ModuleNotFoundError, match=r'eggroll-jax\[rl\]'):
        rl.make_env("brax/hopper")


def test_suite_names():
    assert rl.suite_of("brax/hopper") == ("brax", "hopper")
    assert rl.suite_of("hopper") == ("brax", "hopper")
    assert rl.suite_of("MPE_simple_spread_v3") == ("mpe", "MPE_simple_spread_v3")
    assert rl.suite_of("mpe/simple_spread_v3") == ("mpe", "simple_spread_v3")
    assert rl.suite_of("Navix-DoorKey-8x8-v0")[0] == "navix"
    assert rl.suite_of("Craftax-Classic-Symbolic-v1")[0] == "craftax"
    assert rl.suite_of("Game2048-v1")[0] == "jumanji"
    assert rl.suite_of("Pendulum-v1")[0] == "gymnax"
    assert recipe.preset_key("mpe/simple_spread_v3") == "MPE_simple_spread_v3"
    assert recipe.resolve(recipe.Config(env="mpe/simple_spread_v3"))["population"] == 128  # paper preset
    assert recipe.resolve(recipe.Config(env="mpe/simple_spread_v3", population=64))["population"] == 64


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "my_envs.py").write_text(
        "import gymnax\nfrom eggroll.tasks.rl import from_gymnax\n"
        "def make():\n    env, p = gymnax.make('Acrobot-v1')\n    return from_gymnax(env, p, name='mine')\n"
        "def bad():\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    env = rl.make_env("my_envs:make", max_steps=10)
    assert env.name == "mine" and env.horizon == 10 and env.num_outputs == 3
    with pytest.raises(TypeError, match="from_gymnax"):
        rl.make_env("my_envs:bad")


def test_gae_matches_brute_force():
    rng = np.random.default_rng(0)
    T, gamma, lam = 7, 0.9, 0.8
    r, v = rng.normal(size=(T, 3)), rng.normal(size=(T, 3))
    d = (rng.random((T, 3)) < 0.3).astype(np.float32)
    last = rng.normal(size=3)
    adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(d), jnp.asarray(last), gamma, lam)
    want = np.zeros((T, 3))
    for e in range(3):
        for t in range(T):  # sum_k (gamma lam)^k delta_{t+k}, cut at the first episode end
            total, disc = 0.0, 1.0
            for k in range(t, T):
                v_next = v[k + 1, e] if k + 1 < T else last[e]
                delta = r[k, e] + gamma * v_next * (1 - d[k, e]) - v[k, e]
                total += disc * delta
                if d[k, e]:
                    break
                disc *= gamma * lam
            want[t, e] = total
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want + v, rtol=1e-5, atol=1e-5)


LOOPED_HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %s = f32[] add(%a, %b)
}

%small (p: f32[4]) -> f32[4] {
  %ar1 = f32[1]{0} all-reduce(%p), replica_groups={{0,1}}, to_apply=%add
}

%big (p: f32[4]) -> f32[4] {
  %ar2 = f32[8]{0} all-reduce(%p), replica_groups={{0,1}}, to_apply=%add
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %ag = s32[2]{0} all-gather(%x), replica_groups={{0,1}}, dimensions={0}
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %c = f32[4]{0} conditional(%i, %p, %p), branch_computations={%small, %big}
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ar = bf16[2]{0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add
}
"""


def test_loop_collective_bytes_counts_trips_and_one_branch():
    """A while body counts trip-count times, its condition once more, a conditional its largest branch."""
    from eggroll.distributed import comm

    assert comm.collective_bytes(LOOPED_HLO) == {"all-reduce": 4 + 4 + 32, "all-gather": 4}  # each op once
    assert comm.loop_collective_bytes(LOOPED_HLO) == {"all-reduce": 4 + 3 * 32, "all-gather": 4 * 4}
    fragment = "  %ar = f32[2]{0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add"
    assert comm.loop_collective_bytes(fragment) == comm.collective_bytes(fragment) == {"all-reduce": 8}


def test_communication_counts_collectives_inside_a_scan():
    from jax import lax
    from jax.sharding import PartitionSpec as P

    from eggroll import distributed
    from eggroll.population import AXIS, population_mesh, shard_map_unchecked

    def f(x):  # a psum of the (1, 3) f32 block per device, 5 times
        return lax.scan(lambda c, _: (c + lax.psum(2.0 * c, AXIS), None), x, None, length=5)[0]

    mesh = population_mesh()
    g = jax.jit(shard_map_unchecked(f, mesh=mesh, in_specs=(P(AXIS),), out_specs=P(AXIS)))
    comm = distributed.communication(g, jnp.ones((mesh.size, 3)))
    assert comm["comm_by_kind"] == {"all-reduce": 5 * 12} and comm["comm_bytes_per_device"] == 60


TINY = {"hidden": "16", "population": 16, "eval_every": 2, "eval_episodes": 8, "progress": False, "max_steps": 200}


@pytest.mark.parametrize("strategy", ["eggroll", "open_es"])
def test_es_improves_cartpole(tmp_path, strategy):
    cfg = recipe.Config(env="CartPole-v1", strategy=strategy, budget_steps=25_000, seeds=1, sigma=0.2, lr=0.1,
                        run_dir=str(tmp_path), **TINY)
    res = recipe.run(cfg)
    first = read_metrics(tmp_path / "seed0")[0]
    assert first["generation"] == 0
    assert res["mean_return"] >= first["eval_return"] + 25, (first, res)
    assert res["env"] == "CartPole-v1" and res["strategy"] == strategy and res["env_steps"] >= 25_000
    for name in ("seed0/metrics.jsonl", "seed0/curve.png", "seed0/result.json", "result.json", "config.json"):
        assert (tmp_path / name).exists(), name


def test_cli_ppo_final_json_and_wall_budget(tmp_path, capsys):
    argv = ["train", "rl", "--env", "CartPole-v1", "--strategy", "ppo", "--seeds", "2", "--hidden", "8",
            "--num-envs", "4", "--rollout-len", "16", "--budget-steps", "256", "--eval-episodes", "2",
            "--max-steps", "50", "--run-dir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("env", "strategy", "mean_return", "stderr", "wall_s", "env_steps"):
        assert k in out, k
    assert out["strategy"] == "ppo" and out["env_steps"] == 256 and len(out["per_seed"]) == 2
    assert [r["generations"] for r in out["per_seed"]] == [4, 4]  # 4 updates of 4 x 16 steps


def test_bad_config_is_a_clear_error(capsys):
    assert cli.main(["train", "rl", "--population", "15", "--no-progress"]) == 2
    assert "even" in capsys.readouterr().err


def test_tune_random_search_and_resume(tmp_path):
    from eggroll import tune

    space = json.dumps({"population": [8, 16], "sigma": [0.1, 0.3], "max_steps": [40], "eval_episodes": [2]})
    cfg = tune.Config(env="CartPole-v1", trials=2, budget_steps=1500, hidden="8", space=space, out_dir=str(tmp_path))
    res = tune.run(cfg)
    lines = [json.loads(x) for x in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and res["trials"] == 2
    assert res["best_score"] == max(t["score"] for t in lines)
    assert set(res["best"]) >= {"population", "sigma", "lr", "activation"} and res["best"]["max_steps"] == 40
    assert res["command"].startswith("eggroll train rl --env CartPole-v1 --strategy eggroll --hidden 8")
    assert json.loads((tmp_path / "best.json").read_text())["best"] == res["best"]
    again = tune.run(cfg)  # every trial already done: nothing re-runs, same answer
    assert again["best"] == res["best"] and len((tmp_path / "trials.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="not a tunable field"):
        tune.run(tune.Config(space='{"budget_steps": [1]}', out_dir=str(tmp_path / "x")))


def _state_arrays(run_dir, seeds):
    from safetensors.numpy import load_file

    files = {s: run_dir / f"seed{s}" / "checkpoint" / "arrays.safetensors" for s in seeds}
    return {(s, k): v for s, f in files.items() for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("strategy", ["eggroll", pytest.param("ppo", marks=pytest.mark.slow)])  # ppo: 18 s, slow
def test_resume_continues_interrupted_seeds_exactly_and_skips_finished(tmp_path, capsys, strategy):
    """Seeds stopped by the time limit at generation 0 continue to equal an uninterrupted run; a
    second --resume finds them finished and trains nothing; a changed hyperparameter is refused."""
    own = dict(num_envs=4, rollout_len=8, minibatches=2) if strategy == "ppo" else dict(population=8)
    kw = dict(env="CartPole-v1", strategy=strategy, seeds=2, generations=4, budget_steps=10**6, hidden="8",
              eval_every=2, eval_episodes=2, max_steps=30, progress=False, **own)
    ref = recipe.run(recipe.Config(run_dir=str(tmp_path / "ref"), **kw))
    run = tmp_path / "run"
    cut = recipe.run(recipe.Config(run_dir=str(run), time_limit=1e-9, **kw))
    assert [s["stopped"] for s in cut["per_seed"]] == ["time_limit"] * 2 and cut["env_steps"] == 0
    res = recipe.run(recipe.Config(run_dir=str(run), resume=True, **kw))
    assert res["mean_return"] == ref["mean_return"] and [s["generations"] for s in res["per_seed"]] == [4, 4]
    want, got = _state_arrays(tmp_path / "ref", (0, 1)), _state_arrays(run, (0, 1))
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k], err_msg=str(k))
    before = (run / "seed1" / "metrics.jsonl").read_text()
    capsys.readouterr()
    again = recipe.run(recipe.Config(run_dir=str(run), resume=True, **kw))
    assert "seed 1 is finished" in capsys.readouterr().err
    assert again["per_seed"] == res["per_seed"] and (run / "seed1" / "metrics.jsonl").read_text() == before
    changed = {**kw, "sigma": 0.3} if strategy != "ppo" else {**kw, "ppo_lr": 1e-3}
    with pytest.raises(ValueError, match="cannot resume"):
        recipe.run(recipe.Config(run_dir=str(run), resume=True, **changed))
