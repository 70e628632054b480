"""Recipes under several processes (the harness's contract, docs/DISTRIBUTED.md): parameters
bitwise equal to a one-process run at 2 processes x 1 device and 2 x 2, a killed process stops
the other with a clear message, and --resume continues exactly. (CartPole: test_distributed.py.)"""

import json
import sys

import pytest
from safetensors.numpy import load_file

from eggroll import cli
from test_distributed import kill_one_after_checkpoint, launch, wait_all

pytestmark = pytest.mark.slow

TEXT = ("def main():\n    return sum(x * x for x in range(10))  # squares\n" * 60
        + "The quick brown fox jumps over the lazy dog. " * 80)
EGG = ["--population", "16", "--width", "8", "--tokens-per-update", "4", "--eval-every", "2", "--eval-bytes", "128",
       "--eval-streams", "4", "--final-eval-bytes", "512", "--checkpoint-every", "2", "--no-progress",
       "--sigma-shift", "3", "--alpha", "0.3", "--alpha-decay", "0"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return ["--dataset", str(path), "--cache-dir", str(tmp_path / "cache")]


def _egg(run_dir, generations, corpus, *extra):
    return ["train", "egg", "--run-dir", str(run_dir), "--generations", str(generations), *corpus, *EGG, *extra]


def _reference(argv, capsys):
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _arrays(run_dir):
    return load_file(str(run_dir / "checkpoint" / "arrays.safetensors"))


def _assert_same_state(a, b):
    sa, sb = _arrays(a), _arrays(b)
    assert sorted(sa) == sorted(sb) and len(sa) > 3
    for k in sa:
        assert (sa[k] == sb[k]).all(), k


def _last_json(log):
    return json.loads([ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1])


@pytest.mark.parametrize("processes, devices", [(2, 1), (2, 2)])
def test_egg_processes_match_single_process(tmp_path, capsys, corpus, processes, devices):
    ref = _reference(_egg(tmp_path / "ref", 3, corpus), capsys)
    run = tmp_path / "multi"
    procs, logs = launch([sys.executable, "-m", "eggroll.cli", *_egg(run, 3, corpus)], processes, devices, tmp_path, "e")
    wait_all(procs, logs)
    results = [_last_json(log) for log in logs]
    for r in results:
        assert r["processes"] == processes and r["devices"] == processes * devices
        assert r["valid_bits_per_byte"] == ref["valid_bits_per_byte"]
    _assert_same_state(tmp_path / "ref", run)
    # fitness and carried hidden states cross devices; measured from the compiled program
    assert results[0]["communication"]["comm_bytes_per_process"] > 0


def test_egg_kill_and_resume_matches_uninterrupted(tmp_path, capsys, corpus):
    run = tmp_path / "run"
    stopped_at = kill_one_after_checkpoint([sys.executable, "-m", "eggroll.cli", *_egg(run, 100000, corpus)],
                                           run / "checkpoint" / "meta.json", tmp_path, "a")
    total = stopped_at + 2
    procs, logs = launch([sys.executable, "-m", "eggroll.cli", *_egg(run, total, corpus, "--resume")], 2, 2,
                         tmp_path, "b")
    wait_all(procs, logs)
    ref = _reference(_egg(tmp_path / "ref", total, corpus), capsys)
    _assert_same_state(tmp_path / "ref", run)
    assert _last_json(logs[0])["valid_bits_per_byte"] == ref["valid_bits_per_byte"]
