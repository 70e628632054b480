"""The `rl` recipe under several processes: every seed's final checkpoint (the whole state:
params, optimizer, ES state or PPO environments, keys) bitwise equal to a one-process run, and
kill one process then --resume equal to an uninterrupted run.

What is compared: EGGROLL at 2 processes x 2 devices and 2 x 1 against the in-process run of
this test process (1 process x 4 devices; ES does not depend on the device count, members are
independent); PPO, data parallel (its minibatches are drawn per device), at 2 x 2 against the
in-process 1 x 4 run and at 2 x 1 against a 1-process x 2-device subprocess."""

import json
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

from eggroll import cli
from test_distributed import kill_one_after_checkpoint, launch, proc_env, wait_all

pytestmark = pytest.mark.slow

COMMON = ["--env", "CartPole-v1", "--hidden", "8", "--max-steps", "40", "--eval-every", "2", "--eval-episodes", "4",
          "--no-progress"]
ARGS = {"eggroll": ["--strategy", "eggroll", "--population", "8", "--sigma", "0.2", "--lr", "0.1", *COMMON],
        "ppo": ["--strategy", "ppo", "--num-envs", "4", "--rollout-len", "8", "--minibatches", "2", "--ppo-epochs", "2",
                *COMMON]}
BUDGET = {"eggroll": "1200", "ppo": "192"}


def _rl(run_dir, method, *extra):
    return ["train", "rl", "--run-dir", str(run_dir), *ARGS[method], *extra]


def _reference(argv, capsys):
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _assert_same_state(a, b, seeds=(0,)):
    for s in seeds:
        sa = load_file(str(a / f"seed{s}" / "checkpoint" / "arrays.safetensors"))
        sb = load_file(str(b / f"seed{s}" / "checkpoint" / "arrays.safetensors"))
        assert sorted(sa) == sorted(sb) and len(sa) > 3
        for k in sa:
            assert (sa[k] == sb[k]).all(), (s, k)


def _last_json(log):
    return json.loads([ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1])


@pytest.mark.parametrize("method, processes, devices", [("eggroll", 2, 2), ("eggroll", 2, 1), ("ppo", 2, 2)])
def test_processes_match_single_process(tmp_path, capsys, method, processes, devices):
    argv = ["--seeds", "2", "--budget-steps", BUDGET[method], "--checkpoint-every", "3"]
    ref = _reference(_rl(tmp_path / "ref", method, *argv), capsys)
    run = tmp_path / "multi"
    procs, logs = launch([sys.executable, "-m", "eggroll.cli", *_rl(run, method, *argv)], processes, devices,
                         tmp_path, "m")
    wait_all(procs, logs)
    results = [_last_json(log) for log in logs]
    for r in results:
        assert r["processes"] == processes and r["devices"] == processes * devices
        assert r["mean_return"] == ref["mean_return"] and r["env_steps"] == ref["env_steps"]
        assert [s["generations"] for s in r["per_seed"]] == [s["generations"] for s in ref["per_seed"]]
    _assert_same_state(tmp_path / "ref", run, seeds=(0, 1))
    comm = results[0]["communication"]  # measured from the compiled program
    assert comm["comm_bytes_per_process"] > 0
    if method == "ppo":  # the gradients, epochs x minibatches times per update, beside the env states
        # f32 gradients of every parameter, 2 epochs x 2 minibatches: >= 4 x 4 bytes x n_params
        assert comm["comm_bytes_per_device"] >= 8 * comm["sgd_bf16_bytes"] and "all-gather" in comm["comm_by_kind"]


def test_ppo_two_processes_match_one_process_of_two_devices(tmp_path):
    argv = ["--seeds", "1", "--budget-steps", BUDGET["ppo"]]
    ref = tmp_path / "ref"
    out = subprocess.run([sys.executable, "-m", "eggroll.cli", *_rl(ref, "ppo", *argv)], env=proc_env(2),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["devices"] == 2
    run = tmp_path / "multi"
    procs, logs = launch([sys.executable, "-m", "eggroll.cli", *_rl(run, "ppo", *argv)], 2, 1, tmp_path, "p")
    wait_all(procs, logs)
    _assert_same_state(ref, run)


@pytest.mark.parametrize("method", ["eggroll", "ppo"])
def test_kill_and_resume_matches_uninterrupted(tmp_path, capsys, method):
    run = tmp_path / "run"
    first = _rl(run, method, "--budget-steps", "1000000000", "--generations", "100000", "--checkpoint-every", "2")
    total = kill_one_after_checkpoint([sys.executable, "-m", "eggroll.cli", *first], run / "seed0" / "checkpoint" / "meta.json",
                                      tmp_path, "a") + 3
    again = _rl(run, method, "--budget-steps", "1000000000", "--generations", str(total), "--checkpoint-every", "2",
                "--resume")
    procs, logs = launch([sys.executable, "-m", "eggroll.cli", *again], 2, 2, tmp_path, "b")
    wait_all(procs, logs)
    ref = _reference(_rl(tmp_path / "ref", method, "--budget-steps", "1000000000", "--generations", str(total)), capsys)
    _assert_same_state(tmp_path / "ref", run)
    resumed = _last_json(logs[0])
    assert resumed["mean_return"] == ref["mean_return"] and resumed["per_seed"][0]["generations"] == total
