"""egg-backprop under several processes (data parallel: the streams are split over every device
of every process, the gradients all-reduced): checkpoint arrays bitwise equal to a one-process
run with the same device count at 2 processes x 2 devices and 2 x 1, and a killed process
followed by --resume equals an uninterrupted run."""

import json
import subprocess
import sys

import pytest

from test_distributed import kill_one_after_checkpoint, launch, proc_env, wait_all
from test_recipes_multiprocess import TEXT, _assert_same_state, _last_json, _reference

pytestmark = pytest.mark.slow

BACKPROP = ["--streams", "4", "--layers", "1", "--width", "8", "--seq-len", "8", "--lr", "0.01", "--warmup", "2",
            "--eval-bytes", "128", "--eval-streams", "4", "--no-progress"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return ["--dataset", str(path), "--cache-dir", str(tmp_path / "cache")]


def _backprop(run_dir, generations, corpus, *extra, eval_every=2, checkpoint_every=2):
    return ["train", "egg-backprop", "--run-dir", str(run_dir), "--generations", str(generations), *corpus,
            *BACKPROP, "--eval-every", str(eval_every), "--checkpoint-every", str(checkpoint_every), *extra]


def _one_process(argv, devices, tmp_path):
    """The recipe in a fresh one-process interpreter with `devices` forced CPU devices."""
    out = subprocess.run([sys.executable, "-m", "eggroll.cli", *argv], env=proc_env(devices), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("processes, devices", [(2, 2), (2, 1)])
def test_processes_match_one_process_with_as_many_devices(tmp_path, capsys, corpus, processes, devices):
    argv = _backprop(tmp_path / "ref", 5, corpus)
    if processes * devices == 4:  # this test process has 4 forced CPU devices (conftest.py)
        ref = _reference(argv, capsys)
    else:
        ref = _one_process(argv, processes * devices, tmp_path)
    assert ref["devices"] == processes * devices and ref["processes"] == 1
    run = tmp_path / "multi"
    procs, logs = launch([sys.executable, "-m", "eggroll.cli", *_backprop(run, 5, corpus)], processes, devices,
                         tmp_path, "b")
    wait_all(procs, logs)
    results = [_last_json(log) for log in logs]
    for r in results:
        assert r["processes"] == processes and r["devices"] == processes * devices
        for key in ("valid_bits_per_byte", "egg_eval_bits_per_byte", "train_bits_per_byte"):
            assert r[key] == ref[key], key
    _assert_same_state(tmp_path / "ref", run)
    # the gradient sum (log2(devices) exchanges of the f32 gradient + loss), measured from the compiled step
    comm = results[0]["communication"]
    rounds = (processes * devices).bit_length() - 1
    assert comm["comm_by_kind"]["collective-permute"] == rounds * 4 * (ref["num_params"] + 1)
    assert comm["comm_bytes_sent_per_process"] > 0


def test_kill_and_resume_matches_uninterrupted(tmp_path, capsys, corpus):
    total = 400  # the cosine schedule spans `generations`: the resume and the reference use the same budget
    slow = dict(eval_every=1000, checkpoint_every=5)
    run = tmp_path / "run"
    stopped_at = kill_one_after_checkpoint([sys.executable, "-m", "eggroll.cli", *_backprop(run, total, corpus, **slow)],
                                           run / "checkpoint" / "meta.json", tmp_path, "a", at_least=5)
    assert 5 <= stopped_at < total
    procs, logs = launch([sys.executable, "-m", "eggroll.cli", *_backprop(run, total, corpus, "--resume", **slow)],
                         2, 2, tmp_path, "b")
    wait_all(procs, logs)
    ref = _reference(_backprop(tmp_path / "ref", total, corpus, **slow), capsys)
    _assert_same_state(tmp_path / "ref", run)
    resumed = _last_json(logs[0])
    for key in ("valid_bits_per_byte", "egg_eval_bits_per_byte", "train_bits_per_byte", "steps"):
        assert resumed[key] == ref[key], key
