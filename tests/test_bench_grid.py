"""`eggroll bench throughput --grid`: the plan of each point (chunk, skips) and a resumable run."""

import json

import pytest

from eggroll.bench.throughput import Config
from eggroll.bench.throughput_grid import grid_points, plan_point, run_grid


def test_chunk_is_fixed_in_population_and_big_points_are_skipped():
    cfg = Config(grid=True)
    plans = {(p["width"], p["population"], p["rank"]): plan_point(cfg, p) for p in grid_points(cfg)
             if p["dtype"] == "float32"}
    for w in (256, 1024, 4096):
        for r in (1, 4):
            chunks = {plans[(w, n, r)]["chunk"] for n in (4096, 32768)}
            assert len(chunks) == 1, (w, r, chunks)  # same chunk: memory flat in population
    assert plans[(256, 256, 1)]["skip"] is None and plans[(256, 256, 1)]["skip_t"] is None
    assert "GFLOP" in plans[(4096, 32768, 1)]["skip"]
    assert "GFLOP" in plans[(1024, 32768, 1)]["skip"]
    assert plans[(1024, 4096, 1)]["skip"] is None and "GFLOP" in plans[(1024, 4096, 1)]["skip_t"]
    with pytest.raises(ValueError, match="grid-dtypes"):
        grid_points(Config(grid_dtypes="float16"))
    with pytest.raises(ValueError, match="comma-separated"):
        grid_points(Config(grid_widths="wide"))


def test_tiny_grid_runs_records_and_resumes(tmp_path, capsys):
    out = tmp_path / "grid.jsonl"
    cfg = Config(grid=True, grid_widths="8", grid_populations="8", grid_ranks="1", grid_dtypes="float32",
                 layers=1, tokens=2, grid_reps=1, grid_inner=1, warmup=0, grid_out=str(out))
    summary = run_grid(cfg)
    assert summary["measured"] == 1 and summary["errors"] == 0
    rec = json.loads(out.read_text().splitlines()[0])
    for k in ("forward_over_inference", "update_over_inference", "step_over_inference_t100", "peak_rss_mib"):
        assert rec[k] > 0
    capsys.readouterr()
    again = run_grid(cfg)  # resumed: nothing is measured again
    assert again["table"] == summary["table"] and capsys.readouterr().out == ""
