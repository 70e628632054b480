"""eggroll.runlog: metrics JSONL, resume truncation, wall clock, PNG curve, JSON helpers."""

import json
import math

import numpy as np
import pytest

from eggroll.runlog import RunLog, plot_curves, read_metrics, write_json


def test_log_writes_one_json_line_per_step(tmp_path):
    with RunLog(tmp_path, total=3, progress=False, plot_keys=["loss"]) as log:
        for step in (1, 2, 3):
            rec = log.log(step, {"loss": np.float32(1.0 / step), "vec": np.arange(2)}, note="x")
            assert rec["generation"] == step
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    recs = [json.loads(line) for line in lines]
    assert [r["generation"] for r in recs] == [1, 2, 3]
    assert recs[1]["loss"] == pytest.approx(0.5) and recs[0]["vec"] == [0, 1] and recs[2]["note"] == "x"
    walls = [r["wall_s"] for r in recs]
    assert walls == sorted(walls) and walls[0] >= 0
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_non_finite_values_are_strict_json_null(tmp_path):
    with RunLog(tmp_path, progress=False) as log:
        log.log(1, {"a": float("nan"), "b": -math.inf, "c": np.float64(2.0)})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"generation": 1, "wall_s": json.loads(line)["wall_s"], "a": None, "b": None, "c": 2.0}


def test_fresh_run_starts_a_new_file(tmp_path):
    with RunLog(tmp_path, progress=False) as log:
        log.log(1, loss=1.0)
    with RunLog(tmp_path, progress=False) as log:
        log.log(1, loss=2.0)
    assert [r["loss"] for r in read_metrics(tmp_path)] == [2.0]


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
    log = RunLog(tmp_path, progress=False)
    for step in range(1, 6):
        log.log(step, loss=float(step))
    log.close(plot=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"generation": 6, "loss"')  # torn by a crash
    kept_wall = read_metrics(tmp_path)[2]["wall_s"]

    log = RunLog(tmp_path, progress=False, resume_from=3)
    assert log.elapsed >= kept_wall  # the clock continues from the checkpointed record
    log.log(4, loss=40.0)
    log.close(plot=False)
    recs = read_metrics(tmp_path)
    assert [r["generation"] for r in recs] == [1, 2, 3, 4]
    assert recs[-1]["loss"] == 40.0 and recs[-1]["wall_s"] >= kept_wall
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_resume_with_explicit_wall_offset_and_custom_x(tmp_path):
    with RunLog(tmp_path, x="step", progress=False, resume_from=10, wall_offset=100.0) as log:
        rec = log.log(11, loss=1.0)
    assert rec["step"] == 11 and rec["wall_s"] >= 100.0


def test_plot_groups_and_sparse_metrics(tmp_path):
    recs = [{"generation": g, "wall_s": 0.1 * g, "fitness": float(g), "eval": (float(g) if g % 5 == 0 else None)}
            for g in range(20)]
    out = plot_curves(recs, tmp_path / "c.png", [("fitness", "eval"), "missing"], title="t")
    assert out is not None and out.read_bytes()[:4] == b"\x89PNG"
    assert plot_curves(recs, tmp_path / "none.png", ["missing"]) is None
    assert not (tmp_path / "none.png").exists()


def test_write_json_and_progress_bar_enabled(tmp_path, capsys):
    p = write_json(tmp_path / "sub" / "r.json", {"x": np.float32(1.5), "t": (1, 2)})
    assert json.loads(p.read_text()) == {"x": 1.5, "t": [1, 2]}
    with RunLog(tmp_path / "run", total=2, progress=True, desc="demo", plot_keys=["loss"]) as log:
        log.log(1, loss=1.0)
        log.print("hello")
        log.log(2, loss=0.5)
        log.write_json("result", {"ok": True})
    err = capsys.readouterr().err
    assert "demo" in err and "hello" in err
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == {"ok": True}


def test_write_false_touches_no_file(tmp_path):
    run_dir = tmp_path / "not-created"
    log = RunLog(run_dir, total=3, resume_from=1, wall_offset=2.5, write=False)
    rec = log.log(2, {"fitness": 1.0})
    assert rec["generation"] == 2 and rec["fitness"] == 1.0 and rec["wall_s"] >= 2.5
    assert log.write_json("result", {"a": 1}) is None and log.plot() is None
    log.print("hidden")
    log.close()
    assert not run_dir.exists()
