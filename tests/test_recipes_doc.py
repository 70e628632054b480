"""docs/RECIPES.md's complete minimal recipe runs as written, learns, and resumes exactly."""

import json
import re
import sys
from pathlib import Path

from eggroll.runlog import read_metrics

DOC = Path(__file__).resolve().parents[1] / "docs" / "RECIPES.md"


def test_minimal_recipe_runs_learns_and_resumes(tmp_path, monkeypatch):
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    (tmp_path / "my_recipe.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_recipe

    cfg = dict(population=64, generations=40, eval_every=10, checkpoint_every=20, progress=False)
    full = my_recipe.run(my_recipe.Config(**cfg, run_dir=str(tmp_path / "full")))
    records = read_metrics(tmp_path / "full")
    assert records[0]["generation"] == 0 and full["generations"] == 40
    assert full["mse"] < 0.8 * records[0]["mse"], (records[0], full)
    # half, then --resume to the end: the same result
    my_recipe.run(my_recipe.Config(**{**cfg, "generations": 20}, run_dir=str(tmp_path / "split")))
    resumed = my_recipe.run(my_recipe.Config(**cfg, run_dir=str(tmp_path / "split"), resume=True))
    assert resumed["mse"] == full["mse"]
    assert json.loads((tmp_path / "split" / "result.json").read_text())["generations"] == 40
    del sys.modules["my_recipe"]
