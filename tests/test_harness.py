"""The run harness on a toy 'recipe' (no ES): budgets, time limit, totals, resume, config checks."""

import dataclasses
import json
from dataclasses import dataclass

import jax.numpy as jnp
import pytest

from eggroll import harness
from eggroll.config import flag
from eggroll.runlog import read_metrics


@dataclass
class Config(harness.RunConfig):
    step_size: float = flag(1.0, "added to the counter each generation")
    budget: int = flag(0, "stop once this many units were spent (0: none)")


def make_train(cfg: Config) -> harness.Train:
    return harness.Train(
        name="toy", init=lambda: {"params": jnp.zeros(3)},
        step=lambda s, g: ({"params": s["params"] + cfg.step_size}, {"units": 2, "loss": 1.0 / (g + 1)}),
        evaluate=lambda s, g: {"value": s["params"].sum()}, trajectory=("step_size",), totals=("units",),
        stop=(lambda rec: rec["units"] >= cfg.budget) if cfg.budget else None,
        done=lambda ev: ev["value"] >= 3 * 100, summary=lambda s, r: {"doubled": 2 * r["value"]})


def run(tmp_path, **kw):
    return harness.run(Config(run_dir=str(tmp_path), progress=False, **kw), make_train)


def test_budget_totals_evaluation_and_files(tmp_path):
    r = run(tmp_path, generations=50, eval_every=4, budget=10)
    assert r["generations"] == 5 and r["units"] == 10 and r["stopped"] == "budget"  # 2 units per generation
    assert r["value"] == 15.0 and r["doubled"] == 30.0 and r["train_s"] <= r["wall_s"]
    recs = read_metrics(tmp_path)
    assert [x["generation"] for x in recs] == [0, 1, 2, 3, 4, 5]
    assert recs[-1]["value"] == 15.0 and recs[3]["units"] == 6  # running total
    for name in ("config.json", "result.json", "metrics.jsonl", "curve.png", "checkpoint/meta.json"):
        assert (tmp_path / name).exists(), name


def test_done_time_limit_and_resume(tmp_path):
    assert run(tmp_path / "done", generations=500, eval_every=1, step_size=1.0)["generations"] == 100
    r = run(tmp_path / "t", generations=10**6, eval_every=1000, time_limit=1e-9)
    assert r["stopped"] == "time_limit" and r["generations"] == 0
    run(tmp_path / "r", generations=3, eval_every=2)
    r = run(tmp_path / "r", generations=7, eval_every=2, resume=True)
    assert r["generations"] == 7 and r["value"] == 21.0 and r["units"] == 14
    assert [x["generation"] for x in read_metrics(tmp_path / "r")] == [0, 1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match=r"cannot resume .*step_size: checkpoint 1.0 vs now 2.0"):
        run(tmp_path / "r", generations=9, resume=True, step_size=2.0)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["generations"] == 7


@pytest.mark.parametrize("field, value, match", [("generations", -1, "generations"), ("eval_every", 0, "eval_every"),
                                                 ("time_limit", -1.0, "time_limit")])
def test_bad_run_fields(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        harness.check_run_config(dataclasses.replace(Config(), **{field: value}))


def test_check_population_uses_every_device():
    assert harness.check_population(8) == 2  # 4 test devices
    for pop, match in ((7, "even"), (6, "multiple of the 4 devices"), (1, ">= 2")):
        with pytest.raises(ValueError, match=match):
            harness.check_population(pop)
    with pytest.raises(ValueError, match="chunk 3"):
        harness.check_population(8, 3)
