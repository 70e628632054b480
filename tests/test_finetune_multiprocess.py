"""The LLM fine-tuning recipes under several processes (docs/LLM.md): `train llm` (tiny local
checkpoint) and countdown-mini's EGGROLL fine-tune give checkpoint arrays bitwise equal to a
one-process run at 2 processes x 1 device and 2 x 2 (the reference runs in this process, on its
4 forced CPU devices: every array of the checkpoint is compared, params, optimizer and ES state);
`train llm` killed in one process and continued with --resume equals an uninterrupted run; GRPO
runs data parallel over 2 processes."""

import json
import sys

import pytest
from safetensors.numpy import load_file

from eggroll import cli
from test_distributed import kill_one_after_checkpoint, launch, wait_all

pytestmark = pytest.mark.slow
pytest.importorskip("tokenizers")

LLM = ["--task", "countdown", "--prompts", "2", "--population", "4", "--max-new-tokens", "6",
       "--max-prompt-tokens", "16", "--eval-every", "2", "--eval-problems", "4", "--checkpoint-every", "1",
       "--sigma", "0.05", "--lr", "0.01", "--no-progress", "--template", "{numbers_csv}={target}:"]
MINI = ["--strategies", "eggroll", "--budget-s", "1e9", "--eval-every-s", "1e9", "--eval-every", "2", "--hidden", "16",
        "--layers", "1", "--sft-problems", "200", "--sft-max-steps", "20", "--sft-batch", "16", "--eval-problems", "16",
        "--population", "4", "--es-prompts", "2", "--checkpoint-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from test_llm_recipe import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _llm(run_dir, generations, model, *extra):
    return ["train", "llm", "--model", model, "--run-dir", str(run_dir), "--generations", str(generations), *LLM, *extra]


def _mini(run_dir, generations, *extra):
    return ["train", "countdown-mini", "--run-dir", str(run_dir), "--generations", str(generations), *MINI, *extra]


def _reference(argv, capsys):
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _multi(argv, processes, devices, tmp_path, tag):
    procs, logs = launch([sys.executable, "-m", "eggroll.cli", *argv], processes, devices, tmp_path, tag)
    wait_all(procs, logs)
    return [json.loads([ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1]) for log in logs]


def _assert_same_arrays(a, b):
    sa, sb = load_file(str(a / "arrays.safetensors")), load_file(str(b / "arrays.safetensors"))
    assert sorted(sa) == sorted(sb) and len(sa) > 3
    for k in sa:
        assert (sa[k] == sb[k]).all(), k


@pytest.mark.parametrize("processes, devices", [(2, 1), (2, 2)])
def test_llm_eggroll_processes_match_single_process(tmp_path, capsys, model, processes, devices):
    ref = _reference(_llm(tmp_path / "ref", 3, model), capsys)
    results = _multi(_llm(tmp_path / "multi", 3, model), processes, devices, tmp_path, "l")
    for r in results:
        assert r["processes"] == processes and r["devices"] == processes * devices
        assert r["val_accuracy"] == ref["val_accuracy"] and r["steps"] == 3
    _assert_same_arrays(tmp_path / "ref" / "checkpoint", tmp_path / "multi" / "checkpoint")
    recs = [json.loads(x) for x in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    for k in ("mean_reward", "no_signal_frac", "distinct_answers", "truncation_rate", "prompts_truncated"):
        assert [r.get(k) for r in recs] == [r.get(k) for r in want], k
    # per step each process contributes its 2 members x 2 prompts x 12 bytes + 2 member indices x 4
    assert results[0]["communication"]["comm_bytes_per_process"] == 2 * (2 * 12 + 4)
    assert recs[-1]["comm_bytes_per_process"] == 56


@pytest.mark.parametrize("processes, devices", [(2, 1), (2, 2)])
def test_countdown_mini_eggroll_processes_match_single_process(tmp_path, capsys, processes, devices):
    ref = _reference(_mini(tmp_path / "ref", 3), capsys)
    results = _multi(_mini(tmp_path / "multi", 3), processes, devices, tmp_path, "m")
    for r in results:
        assert r["processes"] == processes and r["devices"] == processes * devices
        assert {k: r[k] for k in ("eggroll_accuracy", "start_accuracy", "sft_steps")} == \
            {k: ref[k] for k in ("eggroll_accuracy", "start_accuracy", "sft_steps")}
    _assert_same_arrays(tmp_path / "ref" / "eggroll-seed0" / "checkpoint", tmp_path / "multi" / "eggroll-seed0" / "checkpoint")
    sft_ref, sft = (load_file(str(p / "sft" / "arrays.safetensors")) for p in (tmp_path / "ref", tmp_path / "multi"))
    assert all((sft_ref[k] == sft[k]).all() for k in sft_ref)
    steps = [json.loads(x) for x in (tmp_path / "multi" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3] and (tmp_path / "multi" / "curves.png").exists()
    # rewards (12 bytes per row: 2 members x 2 prompts) + member indices + the agreed step seconds
    assert results[0]["eggroll_communication"]["comm_bytes_per_process"] == 2 * (2 * 12 + 4) + 8


def test_llm_kill_and_resume_matches_uninterrupted(tmp_path, capsys, model):
    run = tmp_path / "run"
    stopped_at = kill_one_after_checkpoint([sys.executable, "-m", "eggroll.cli", *_llm(run, 100000, model)],
                                           run / "checkpoint" / "meta.json", tmp_path, "a")
    total = stopped_at + 2
    results = _multi(_llm(run, total, model, "--resume"), 2, 2, tmp_path, "b")
    ref = _reference(_llm(tmp_path / "ref", total, model), capsys)
    _assert_same_arrays(tmp_path / "ref" / "checkpoint", run / "checkpoint")
    assert results[0]["val_accuracy"] == ref["val_accuracy"] and results[0]["steps"] == total
    gens = [json.loads(x)["generation"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert gens == list(range(total + 1))  # nothing repeated or lost across the kill


def test_llm_grpo_data_parallel_over_two_processes(tmp_path, model):
    """Each process samples its prompt; gradients are all-reduced (the harness's checkpoint checks
    that both processes hold the same state)."""
    argv = _llm(tmp_path / "g", 2, model, "--strategy", "grpo", "--group-size", "2", "--kl-coef", "0.1")
    results = _multi(argv, 2, 1, tmp_path, "g")
    assert results[0]["val_accuracy"] == results[1]["val_accuracy"] and results[0]["steps"] == 2
    comm = results[0]["communication"]
    assert comm["comm_by_kind"]["all-reduce"] >= 4 * results[0]["num_params"]  # the float32 gradients
    assert comm["comm_bytes_per_process"] >= comm["update_bytes_per_device_per_optimizer_step"] + 2 * 12


def test_countdown_mini_kill_and_resume_matches_uninterrupted(tmp_path, capsys):
    run = tmp_path / "run"
    total = kill_one_after_checkpoint([sys.executable, "-m", "eggroll.cli", *_mini(run, 100000)],
                                      run / "eggroll-seed0" / "checkpoint" / "meta.json", tmp_path, "k") + 2
    results = _multi(_mini(run, total, "--resume"), 2, 2, tmp_path, "r")
    ref = _reference(_mini(tmp_path / "ref", total), capsys)
    _assert_same_arrays(tmp_path / "ref" / "eggroll-seed0" / "checkpoint", run / "eggroll-seed0" / "checkpoint")
    assert results[0]["eggroll_accuracy"] == ref["eggroll_accuracy"]
