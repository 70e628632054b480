"""`eggroll bench gpu`: every part's command line is valid at both sizes, parts run time-boxed and
report as they finish, a part that overruns its box is reported and the next still runs."""

import argparse
import importlib
import json

import pytest

from eggroll import cli
from eggroll.bench import gpu
from eggroll.config import add_dataclass_flags, config_from_flags, parse_config


@pytest.mark.parametrize("size", ["args", "tiny"])
@pytest.mark.parametrize("name", sorted(gpu.PARTS))
def test_every_part_parses(name, size):
    args = [a.replace("{tmp}", "/tmp/x") for a in getattr(gpu.PARTS[name], size)]
    table = {"bench": cli.BENCHES, "train": cli.RECIPES}[args[0]]
    mod = importlib.import_module(table[args[1]][0])
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, mod.Config)
    cfg = parse_config(parser, mod.Config, list(args[2:]), getattr(mod, "PRESETS", None))
    if args[1] == "egg-throughput":  # its recipe flags parse too
        from eggroll.recipes import egg

        rc = egg.resolve(config_from_flags(egg, cfg.flags))
        if size == "args":
            assert (rc.population, rc.width, rc.layers) == (262144, 256, 6)


def test_bad_parts_are_refused():
    with pytest.raises(ValueError, match="unknown part"):
        gpu.selected(gpu.Config(parts="nope"))
    with pytest.raises(ValueError, match="time-scale"):
        gpu.selected(gpu.Config(time_scale=0))


def test_tiny_part_runs_and_an_overrun_is_reported(tmp_path, capsys):
    out = tmp_path / "gpu.jsonl"
    summary = gpu.run(gpu.Config(tiny=True, parts="throughput", out=str(out)))
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["ok"] and rec["result"]["forward_over_inference"] > 0 and summary["failed"] == []
    cut = gpu.run(gpu.Config(tiny=True, parts="throughput,egg", time_scale=1e-3))  # 1 s boxes
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["part"] for r in printed[-2:]] == ["throughput", "egg"]
    assert all(r.get("timed_out") for r in printed[-2:]) and cut["failed"] == ["throughput", "egg"]


def test_tmp_dirs_are_fresh_and_an_overrun_keeps_its_printed_lines(monkeypatch):
    seen = []

    def fake_run(argv, **kw):
        seen.append(argv)
        raise gpu.subprocess.TimeoutExpired(argv, kw["timeout"], output=b'{"env": "a", "s_per_gen": 0.5}\nnot json\n')

    monkeypatch.setattr(gpu.subprocess, "run", fake_run)
    rec = gpu.run_part("rl", gpu.Config(tiny=True))
    rec2 = gpu.run_part("rl", gpu.Config(tiny=True))
    out_dirs = [a[a.index("--out-dir") + 1] for a in seen]
    assert "{tmp}" not in " ".join(seen[0]) and out_dirs[0] != out_dirs[1]  # never an earlier run's results
    assert rec["timed_out"] and rec["partial"] == [{"env": "a", "s_per_gen": 0.5}] and rec2["partial"]


@pytest.mark.slow
def test_tiny_countdown_and_rl_parts_run():
    summary = gpu.run(gpu.Config(tiny=True, parts="countdown,rl"))
    assert summary["failed"] == [], summary
    assert set(summary["parts"]["rl"]["speed"]) == {"CartPole-v1", "Pendulum-v1"}
    assert 0 <= summary["parts"]["countdown"]["eggroll_accuracy"] <= 1
