"""The CartPole recipe: learning smoke tests, bitwise resume, CLI, config validation."""

import json

import jax
import numpy as np
import pytest

from eggroll import cli
from eggroll.checkpoint import load_checkpoint
from eggroll.recipes import cartpole as cp
from eggroll.runlog import read_metrics

# Tiny and fast: 8 hidden units, 16 members (divisible by the 4 test devices).
TINY = dict(hidden="8", population=16, eval_every=5, eval_episodes=8, progress=False)


def _initial_return(run_dir):
    first = read_metrics(run_dir)[0]
    assert first["generation"] == 0
    return first["eval_return"]


@pytest.mark.parametrize("strategy", ["eggroll", "open_es"])
def test_learns_over_initial_policy(tmp_path, strategy):
    cfg = cp.Config(strategy=strategy, seed=0, generations=15, run_dir=str(tmp_path), **TINY)
    result = cp.run(cfg)
    before = _initial_return(tmp_path)
    assert result["generations"] == 15 and result["strategy"] == strategy
    assert result["final_return"] >= before + 25, (before, result)
    assert result["env_steps"] > 0 and result["wall_s"] > 0 and result["run_dir"] == str(tmp_path)
    records = read_metrics(tmp_path)
    assert [r["generation"] for r in records] == list(range(16))
    assert records[-1]["eval_return"] == result["final_return"]
    for name in ("metrics.jsonl", "curve.png", "config.json", "result.json", "checkpoint/meta.json"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "result.json").read_text())["final_return"] == result["final_return"]


def test_episode_return_masks_steps_after_done():
    """An episode's return is its length: rewards after `done` (gymnax auto-resets) don't count."""
    from eggroll.tasks import rl as rlt

    train = cp.make_train(cp.Config(**TINY))
    params = train.init().params
    env = rlt.make_env(cp.ENV_NAME)
    key = jax.random.PRNGKey(3)
    ret, length = jax.jit(lambda p, k: rlt.episode(env, rlt.mlp_apply(p), k))(params, key)
    assert 0 < int(length) < 500  # the untrained policy fails early ...
    assert float(ret) == int(length)  # ... and nothing after that is counted


def _train_cli(run_dir, generations, *extra):
    argv = ["train", "cartpole", "--run-dir", str(run_dir), "--generations", str(generations),
            "--hidden", "8", "--population", "16", "--eval-every", "1", "--eval-episodes", "4",
            "--checkpoint-every", "0", "--no-progress", "--seed", "1", *extra]
    return argv


def _final_line(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_resume_is_bitwise_identical(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli.main(_train_cli(straight, 4)) == 0
    r_straight = _final_line(capsys)
    assert cli.main(_train_cli(split, 2)) == 0
    r_half = _final_line(capsys)
    assert r_half["generations"] == 2
    # a line logged after the checkpoint (as if the run had crashed) must not survive the resume
    with open(split / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"generation": 3, "wall_s": 1.0, "fitness_mean": -1.0}) + "\n{torn")
    assert cli.main(_train_cli(split, 4, "--resume")) == 0
    r_split = _final_line(capsys)
    assert r_split["generations"] == r_straight["generations"] == 4
    assert r_split["final_return"] == r_straight["final_return"]
    assert r_split["env_steps"] == r_straight["env_steps"]

    template = cp.make_train(cp.Config(hidden="8", population=16, seed=1)).init()
    a, meta_a = load_checkpoint(straight / "checkpoint", template)
    b, meta_b = load_checkpoint(split / "checkpoint", template)
    assert meta_a["generation"] == meta_b["generation"] == 4
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # params, opt state, ES state, rng

    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("wall_s", "train_s")} for r in recs]  # noqa: E731
    assert strip(read_metrics(split)) == strip(read_metrics(straight))
    walls = [r["wall_s"] for r in read_metrics(split)]
    assert walls == sorted(walls)  # the wall clock continues across the resume


def test_resume_rejects_a_different_config(tmp_path, capsys):
    assert cli.main(_train_cli(tmp_path, 1)) == 0
    capsys.readouterr()
    assert cli.main(_train_cli(tmp_path, 2, "--resume", "--sigma", "0.5")) == 2  # one clear line, no traceback
    err = capsys.readouterr().err
    assert "cannot resume" in err and "sigma" in err and "Traceback" not in err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "cartpole", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--strategy", "--population", "--sigma", "--rank", "--lr", "--optimizer", "--hidden",
                 "--generations", "--episodes", "--seed", "--run-dir", "--checkpoint-every", "--resume",
                 "--target-return", "--eval-every", "--eval-episodes"):
        assert flag in out, flag
    assert "open_es" in out
    with pytest.raises(SystemExit) as e:  # choices are enforced by the parser
        cli.main(["train", "cartpole", "--strategy", "nope"])
    assert e.value.code == 2


@pytest.mark.parametrize("field, value, match", [
    ("population", 6, "multiple of the 4"),
    ("population", 0, "population"),
    ("sigma", 0.0, "sigma"),
    ("lr", -1.0, "lr"),
    ("hidden", "8,x", "hidden"),
    ("hidden", "0", "hidden"),
    ("rank", 3, "rank 3 exceeds"),
    ("strategy", "cma", "strategy"),
    ("optimizer", "lion", "optimizer"),
    ("episodes", 0, "episodes"),
    ("eval_every", 0, "eval_every"),
    ("chunk", 3, "chunk"),
])
def test_bad_config_is_rejected(field, value, match):
    if field == "population" and value == 6 and jax.local_device_count() != 4:
        pytest.skip("needs the 4 test devices")
    with pytest.raises(ValueError, match=match):
        cp.validate(cp.Config(**{field: value}))


@pytest.mark.slow
def test_default_recipe_solves_cartpole(tmp_path):
    result = cp.run(cp.Config(run_dir=str(tmp_path), progress=False))
    assert result["final_return"] >= 475, result
    assert result["solved"] and result["wall_s"] < 120, result


def test_step_never_returns_the_noise_table():
    """The noise context is a jit argument: no output of a step is as large as the table."""
    from eggroll import noise as nz

    train = cp.make_train(cp.Config(**TINY))
    state, metrics = train.step(train.init(), 0)
    sizes = [np.size(x) for x in jax.tree_util.tree_leaves((state, metrics))]
    assert sizes and max(sizes) < nz.DEFAULT_TABLE_SIZE
