"""`bench rl`'s comparison numbers (bench.rl_compare) against hand-computed values, and its table."""

import math

import numpy as np
import pytest

from eggroll.bench import rl as bench_rl
from eggroll.bench import rl_compare as rc


def _curve(steps, ret, wall=None):
    steps = np.asarray(steps, float)
    return {"steps": steps, "ret": np.asarray(ret, float), "wall": np.asarray(wall if wall is not None else steps / 10)}


def test_equal_steps_reads_every_method_at_the_shortest_extent():
    # eggroll reached 400 steps, open_es only 200: both are read at 200, eggroll by interpolation
    curves = {"eggroll": [_curve([0, 100, 400], [0, 10, 40]), _curve([0, 200, 400], [2, 22, 42])],
              "open_es": [_curve([0, 200], [0, 30]), _curve([0, 250], [2, 27])]}
    out = rc.compare(curves)
    assert out["steps"]["extent"] == 200
    egg = out["steps"]["methods"]["eggroll"]
    assert egg["per_seed"] == pytest.approx([10 + 30 * 100 / 300, 22])  # 20 and 22
    assert egg["mean"] == pytest.approx(21) and egg["stderr"] == pytest.approx(1.0)
    oes = out["steps"]["methods"]["open_es"]
    assert oes["per_seed"] == pytest.approx([30, 2 + 25 * 200 / 250]) and oes["mean"] == pytest.approx(26)
    assert out["start_return"] == pytest.approx(1.0)  # mean of the four first evaluations
    norm = out["steps"]["normalised"]
    assert norm["open_es"] == pytest.approx(1.0) and norm["eggroll"] == pytest.approx((21 - 1) / (26 - 1))
    # gap -5 against a combined stderr hypot(1, 4) = 4.12: worse
    assert out["verdict"] == "worse" and math.hypot(1, 4) < 5
    assert out["wall"]["extent"] == pytest.approx(20)


@pytest.mark.parametrize("egg, oes, expected", [((10, 1), (9.5, 1), "competitive"), ((12, 1), (10, 1), "better"),
                                                ((8, 1), (10, 1), "worse"), ((9, 0), (10, 2), "competitive"),
                                                ((0.1077, 1e-5), (0.1074, 3e-4), "competitive"),  # a 0.3% gap: a tie
                                                ((0.1077, 1e-5), (0.1060, 3e-4), "better")])
def test_verdict_is_one_combined_standard_error(egg, oes, expected):
    assert rc.verdict({"mean": egg[0], "stderr": egg[1]}, {"mean": oes[0], "stderr": oes[1]}) == expected


def test_normalised_when_nothing_improved():
    pts = {"eggroll": {"mean": 5.0}, "open_es": {"mean": 5.0}}
    assert rc.normalised(pts, start=5.0) == {"eggroll": 1.0, "open_es": 1.0}


def test_table_counts_the_verdicts_and_shows_errors():
    res = {"s_per_gen": 0.5, "num_params": 10, "mean_return": 1.0, "stderr": 0.1}
    curves = {"eggroll": [_curve([0, 100], [0, 10]), _curve([0, 100], [0, 12])],
              "open_es": [_curve([0, 100], [0, 5]), _curve([0, 100], [0, 6])]}
    rows = [{"env": "a", "suite": "gymnax", "results": {"eggroll": res, "open_es": {**res, "s_per_gen": 1.0}},
             "errors": {}, "compare": rc.compare(curves)},
            {"env": "b", "suite": "kinetix", "results": {}, "errors": {"eggroll": "ModuleNotFoundError: kinetix"}}]
    md = bench_rl.table(rows, ["eggroll", "open_es"])
    assert "| a | gymnax | 100 | 11 ± 1 (1.00) | 5.5 ± 0.5 (0.50) | better |" in md
    assert "| 0.50 | 10 |" in md  # EGGROLL / OpenES seconds per generation
    assert "b (errors: eggroll: ModuleNotFoundError: kinetix)" in md
    assert "over 1 environments: better 1, competitive 0, worse 0" in md


def test_default_envs_cover_every_suite_and_the_named_six():
    from eggroll.tasks import rl as rlt

    assert len(bench_rl.SIXTEEN_ENVS) == 16 and len(set(bench_rl.SIXTEEN_ENVS)) == 16
    suites = {rlt.suite_of(e)[0] for e in bench_rl.SIXTEEN_ENVS}
    assert suites == {"gymnax", "brax", "craftax", "jumanji", "kinetix", "navix"}
    named = {"Pendulum-v1", "brax/inverted_double_pendulum", "Craftax-Symbolic-v1", "Game2048-v1",
             "kinetix/m/h17_thrustcontrol_left", "Navix-DoorKey-8x8-v0"}
    assert named <= set(bench_rl.SIXTEEN_ENVS)
    assert {rlt.suite_of(e)[0] for e in bench_rl.MPE_ENVS} == {"mpe"}


def test_ppo_reference_gives_rejax_our_resolved_settings(monkeypatch):
    from eggroll.bench import ppo_reference as pr
    from eggroll.recipes import rl as recipe
    from eggroll.recipes import rl_presets
    from eggroll.recipes.rl_presets import resolve

    monkeypatch.setattr(rl_presets, "TUNED", {})  # the hand preset below, whatever has been tuned since

    hp = resolve(recipe.Config(env="Pendulum-v1", strategy="ppo", anneal_lr=False))
    conf = pr.rejax_config(hp, "Pendulum-v1", 4096)
    assert (conf["num_envs"], conf["num_steps"], conf["num_epochs"], conf["num_minibatches"]) == (
        hp["num_envs"], hp["rollout_len"], hp["ppo_epochs"], hp["minibatches"])
    assert conf["learning_rate"] == hp["ppo_lr"] == 1e-3 and conf["ent_coef"] == hp["ent_coef"] == 0.0  # the preset
    assert conf["agent_kwargs"] == {"activation": "tanh", "hidden_layer_sizes": (256, 256, 256)}
    assert conf["total_timesteps"] == 4096
    with pytest.raises(ValueError, match="gymnax or brax"):
        pr.run(pr.Config(envs="Game2048-v1"))


def test_ppo_reference_gives_brax_our_resolved_settings():
    """brax's PPO collects batch_size x num_minibatches unrolls of unroll_length per update: with
    batch_size = num_envs / minibatches that is one rollout_len unroll per env, as ours."""
    from eggroll.bench import ppo_reference as pr
    from eggroll.recipes import rl as recipe
    from eggroll.recipes.rl_presets import resolve

    hp = resolve(recipe.Config(env="brax/inverted_pendulum", strategy="ppo", anneal_lr=False))
    conf = pr.brax_config(hp, 10_000, 8)
    assert conf["batch_size"] * conf["num_minibatches"] * conf["unroll_length"] == hp["num_envs"] * hp["rollout_len"]
    assert (conf["num_envs"], conf["num_minibatches"], conf["num_updates_per_batch"]) == (
        hp["num_envs"], hp["minibatches"], hp["ppo_epochs"])
    assert (conf["learning_rate"], conf["entropy_cost"], conf["discounting"], conf["clipping_epsilon"]) == (
        hp["ppo_lr"], hp["ent_coef"], hp["gamma"], hp["clip_eps"])
    assert conf["clipping_epsilon_value"] == hp["clip_eps"] and conf["num_eval_envs"] == 8 and conf["deterministic_eval"]
    assert conf["normalize_observations"] is False and conf["num_timesteps"] == 10_000
    with pytest.raises(ValueError, match="divisible"):
        pr.brax_config({**hp, "num_envs": 6, "minibatches": 4}, 10_000, 8)


@pytest.mark.slow
def test_ppo_reference_runs_both(tmp_path):
    pytest.importorskip("rejax")
    from eggroll.bench import ppo_reference as pr

    out = pr.run(pr.Config(envs="CartPole-v1", seeds=1, budget_steps=4096, eval_episodes=2, out_dir=str(tmp_path)))
    row = out["rows"]["CartPole-v1"]
    assert row["implementation"] == "rejax"
    assert row["ours"]["mean"] > 0 and row["reference"]["mean"] > 0 and isinstance(row["within"], bool)


@pytest.mark.slow
def test_ppo_reference_runs_brax(tmp_path):
    pytest.importorskip("brax")
    from eggroll.bench import ppo_reference as pr

    out = pr.run(pr.Config(envs="brax/inverted_pendulum", seeds=1, budget_steps=4096, eval_episodes=2,
                           out_dir=str(tmp_path)))
    row = out["rows"]["brax/inverted_pendulum"]
    assert row["implementation"] == "brax" and row["ours"]["mean"] > 0 and row["reference"]["mean"] > 0


def test_env_budgets_size_each_env_and_a_changed_preset_reruns(tmp_path, monkeypatch):
    """--env-budgets gives one env its own step budget; a finished (env, method) is not re-run
    by the same command, but is once its resolved hyperparameters change (e.g. a new tuned preset)."""
    from eggroll.bench import rl as bench_rl
    from eggroll.recipes import rl_presets

    for bad in ('{"Acrobot-v1": 100}', '{"CartPole-v1": 0}', "not json"):
        with pytest.raises(ValueError, match="env-budgets"):
            bench_rl.env_budgets(bench_rl.Config(env_budgets=bad), ["CartPole-v1"])
    cfg = bench_rl.Config(envs="CartPole-v1", methods="eggroll", seeds=2, budget_steps=10**6, budget_wall_s=0,
                          env_budgets='{"CartPole-v1": 600}', hidden="8", population=8, eval_episodes=2,
                          out_dir=str(tmp_path))
    calls = []
    real_run = bench_rl.recipe.run
    monkeypatch.setattr(bench_rl.recipe, "run", lambda rc: calls.append(rc) or real_run(rc))
    out = bench_rl.run(cfg)
    row = out["rows"][0]
    assert row["budget_steps"] == 600 and calls[0].budget_steps == 600
    assert 600 <= row["eggroll"]["env_steps"] < 600 + 8 * 500  # stops at the first generation past its budget
    bench_rl.run(cfg)
    assert len(calls) == 1  # finished: not re-run
    monkeypatch.setattr(rl_presets, "TUNED", {"CartPole-v1": {"eggroll": {"hp": {"sigma": 0.3}}}})
    bench_rl.run(cfg)
    assert len(calls) == 2 and bench_rl.recipe.resolve(calls[1])["sigma"] == 0.3
