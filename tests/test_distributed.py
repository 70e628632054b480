"""Multi-process training on localhost (jax.distributed, gloo CPU collectives): launch resolution,
communication accounting, host-side fitness, bitwise equality across process/device layouts,
and what happens when a process dies (clear exit, exact resume).

The multi-process tests start real processes on 127.0.0.1 (free ports), each with its own
XLA_FLAGS (forced CPU device count) and JAX_PLATFORMS=cpu."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eggroll import distributed as dist
from eggroll.population import evaluate_population

HERE = Path(__file__).parent
WORKER = HERE / "dist_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    for k in list(env):  # a Slurm allocation around pytest must not leak into the children
        if k.startswith(("SLURM_", "EGGROLL_")):
            del env[k]
    return env


def launch(cmd, processes: int, devices: int, logdir: Path, tag: str):
    """Start `processes` copies of cmd + the distributed flags; -> (Popen list, log paths)."""
    port = free_port()
    procs, logs = [], []
    for i in range(processes):
        log = logdir / f"{tag}.{i}.log"
        flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]
        procs.append(subprocess.Popen([*cmd, *flags], env=proc_env(devices), stdout=open(log, "w"),
                                      stderr=subprocess.STDOUT))
        logs.append(log)
    return procs, logs


def wait_all(procs, logs, timeout=300):
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"{log} (exit {p.returncode}):\n{log.read_text()[-3000:]}"


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- launch resolution

def test_resolve_flags_env_and_single():
    assert dist.resolve(environ={}) == dist.Launch(None, 1, 0, "single")
    assert dist.resolve("h:1234", 4, 2, environ={}) == dist.Launch("h:1234", 4, 2, "flags")
    env = {"EGGROLL_COORDINATOR": "10.0.0.1:99", "EGGROLL_NUM_PROCESSES": "3", "EGGROLL_PROCESS_ID": "1"}
    assert dist.resolve(environ=env) == dist.Launch("10.0.0.1:99", 3, 1, "env")
    # a flag beats the environment; JAX_* names are accepted too
    assert dist.resolve(process_id=2, environ=env).process_id == 2
    jenv = {"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert dist.resolve(environ=jenv) == dist.Launch("a:1", 2, 0, "env")
    assert dist.resolve(num_processes=1, environ={}).num_processes == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_processes=2, process_id=0), "--coordinator"),
    (dict(coordinator="h:1", num_processes=2), "--process-id"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), "0..1"),
    (dict(coordinator="nohost", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(num_processes=0), ">= 1"),
    (dict(num_processes=1, process_id=1), "--num-processes"),
])
def test_resolve_rejects_bad_launches(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dist.resolve(environ={}, **kwargs)
    with pytest.raises(ValueError, match="integer"):
        dist.resolve(environ={"EGGROLL_NUM_PROCESSES": "two"})


def test_cli_rejects_an_incomplete_launch(capsys):
    from eggroll import cli

    assert cli.main(["train", "cartpole", "--generations", "1", "--num-processes", "2"]) == 2
    err = capsys.readouterr().err
    assert "--coordinator HOST:PORT" in err and "Traceback" not in err


def test_slurm_detection():
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_PROCID": "5",
           "SLURM_STEP_NODELIST": "gpu[007-010,012],cpu1"}
    launch = dist.resolve(environ=env)
    assert launch == dist.Launch(f"gpu007:{20000 + 4242 % 20000}", 8, 5, "slurm")
    assert dist.resolve(environ={**env, "EGGROLL_PORT": "5555"}).coordinator == "gpu007:5555"
    assert dist.resolve(environ={**env, "SLURM_NTASKS": "1"}).source == "single"  # one task: no init
    assert dist.resolve("me:1", 2, 0, environ=env).source == "flags"  # explicit flags win
    for nodes, first in [("node1", "node1"), ("a,b", "a"), ("n[3]", "n3"), ("x-[1,3]", "x-1")]:
        assert dist.first_slurm_host(nodes) == first


# --------------------------------------------------------------------------- communication

def test_collective_bytes_parses_compiled_hlo():
    text = "\n".join([
        "  %ag = f32[16]{0} all-gather(%a), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}",
        "  %ag2 = s32[16]{0} all-gather(%b), channel_id=2, replica_groups=[1,4]<=[4], dimensions={0}",
        "  %ar = bf16[1000]{0} all-reduce(%g), channel_id=3, replica_groups={{0,1}}, to_apply=%add",
        "  %ags = (f32[4]{0}, f32[16]{0}) all-gather-start(%c), replica_groups={{0,1,2,3}}, dimensions={0}",
        "  %agd = f32[16]{0} all-gather-done(%ags)",
        "  %rs = f32[2]{0} reduce-scatter(%d), replica_groups={{0,1}}, dimensions={0}, to_apply=%add",
        "  %m = f32[16]{0} multiply(%x, %y)",
    ])
    got = dist.collective_bytes(text)
    assert got == {"all-gather": 16 + 16 + 16, "all-reduce": 2000, "reduce-scatter": 16}


def test_communication_counts_only_the_fitness_and_not_the_model():
    """Measured from the compiled generation: N x (bytes per member's outputs), whatever the model size."""
    n = 16

    def measure(width):
        w = jnp.ones((width, width))

        def gen(w):
            def fit(m):
                return jnp.tanh(w * m).sum(), m.astype(jnp.int32)  # f32 + s32 per member

            f, aux = evaluate_population(fit, n)
            return w + f.mean() + aux.sum(), f

        return dist.communication(jax.jit(gen), w, n_params=w.size)

    small, big = measure(8), measure(256)
    n_dev = jax.device_count()
    assert small["comm_bytes_per_device"] == big["comm_bytes_per_device"] == (n // n_dev) * 8
    assert small["comm_bytes_per_process"] == n * 8  # one process holds every device here
    assert big["sgd_bf16_bytes"] == 2 * 256 * 256 and small["sgd_bf16_bytes"] == 2 * 64


def test_host_fitness_and_local_members_single_process():
    sys.path.insert(0, str(HERE))
    from dist_worker import host_member_fitness

    members = dist.local_members(16)
    np.testing.assert_array_equal(members, np.arange(16))
    got = dist.host_fitness(host_member_fitness, 16)
    np.testing.assert_array_equal(got, host_member_fitness(np.arange(16)))
    with pytest.raises(ValueError, match="expected"):
        dist.host_fitness(lambda ms: np.zeros(3), 16)
    with pytest.raises(ValueError, match="divisible"):
        dist.local_members(6)


# --------------------------------------------------------------------------- multi-process runs

@pytest.fixture(scope="module")
def worker_reference():
    """The tiny worker's training loop in this process (1 process x 4 devices)."""
    sys.path.insert(0, str(HERE))
    from dist_worker import POPULATION, host_member_fitness, train

    assert jax.device_count() == 4
    return train(3), host_member_fitness(np.arange(POPULATION))


@pytest.mark.parametrize("processes, devices", [(2, 2), pytest.param(4, 1, marks=pytest.mark.slow)])
def test_processes_match_single_process_bitwise(tmp_path, worker_reference, processes, devices):
    ref_params, ref_host = worker_reference
    procs, logs = launch([sys.executable, str(WORKER), "--generations", "3", "--out", str(tmp_path)],
                         processes, devices, tmp_path, "w")
    wait_all(procs, logs, timeout=240)
    ref = jax.tree_util.tree_leaves(ref_params)
    for i in range(processes):  # every process holds the single-process parameters, bit for bit
        got = np.load(tmp_path / f"params_{i}.npz")
        assert len(got.files) == len(ref)
        for j, x in enumerate(ref):
            np.testing.assert_array_equal(got[f"l{j}"], x)
        np.testing.assert_array_equal(np.load(tmp_path / f"host_{i}.npy"), ref_host)
        checks = (tmp_path / f"checks_{i}.txt").read_text().splitlines()
        assert checks[0] == "agree: ok"
        assert checks[1].startswith("differ: the processes hold different"), checks
        assert checks[2].startswith("missing: ") and "not on process(es) [1" in checks[2], checks
    # the host fitness was computed once per member, each process on its own contiguous shard
    shards = [np.load(tmp_path / f"members_{i}.npy") for i in range(processes)]
    per = len(ref_host) // processes
    for i, shard in enumerate(shards):
        np.testing.assert_array_equal(shard, np.arange(i * per, (i + 1) * per))


def _survivor_exits_with_message(procs, logs, victim, how, limit=60.0):
    t0 = time.monotonic()
    os.kill(procs[victim].pid, how)
    survivor = 1 - victim
    try:
        procs[survivor].wait(timeout=limit + 30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    took = time.monotonic() - t0
    print(f"survivor exited {took:.1f} s after the peer was hit")
    text = logs[survivor].read_text()
    assert procs[survivor].returncode == dist.EXIT_PEER_LOST, text[-3000:]
    assert took < limit, took
    assert "lost a peer" in text and "--resume" in text, text[-3000:]
    return took


def _wait_for(pred, procs, timeout=240):
    deadline = time.monotonic() + timeout
    while not pred():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a process exited early with {p.returncode}")
        assert time.monotonic() < deadline, "timed out waiting for the run to progress"
        time.sleep(0.2)


def kill_one_after_checkpoint(cmd, meta, logdir, tag, at_least: int = 2) -> int:
    """Run cmd on 2 processes x 2 devices, SIGKILL process 1 once the checkpoint whose meta.json
    is `meta` reached generation `at_least`, check that the survivor stops with the peer-lost
    message, and return the checkpointed generation (what --resume continues from)."""
    procs, logs = launch(cmd, 2, 2, logdir, tag)
    _wait_for(lambda: meta.exists() and json.loads(meta.read_text())["metadata"]["generation"] >= at_least, procs)
    _survivor_exits_with_message(procs, logs, 1, signal.SIGKILL)
    return json.loads(meta.read_text())["metadata"]["generation"]


def _progress(path):
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.parametrize("victim, how", [(1, signal.SIGKILL),
                                         pytest.param(0, signal.SIGKILL, marks=pytest.mark.slow)])
def test_killed_peer_stops_the_survivor(tmp_path, victim, how):
    """A dead peer breaks the next all-gather: the survivor prints one line and exits with 3."""
    procs, logs = launch([sys.executable, str(WORKER), "--generations", "100000", "--sleep", "0.05",
                          "--out", str(tmp_path)], 2, 1, tmp_path, "k")
    _wait_for(lambda: _progress(tmp_path / "progress") >= 3, procs)
    _survivor_exits_with_message(procs, logs, victim, how)


@pytest.mark.slow
def test_hung_peer_is_caught_by_the_heartbeat(tmp_path):
    """A stopped (not dead) peer never closes its sockets: the heartbeat watchdog catches it."""
    procs, logs = launch([sys.executable, str(WORKER), "--generations", "100000", "--sleep", "0.05",
                          "--peer-timeout", "5", "--out", str(tmp_path)], 2, 1, tmp_path, "h")
    _wait_for(lambda: _progress(tmp_path / "progress") >= 3, procs)
    took = _survivor_exits_with_message(procs, logs, 1, signal.SIGSTOP, limit=30)
    assert took >= 4.0  # it waited for the timeout, not for a socket error
    assert "no heartbeat" in logs[0].read_text()


# --------------------------------------------------------------------------- the cartpole recipe

CARTPOLE = ["--hidden", "8", "--population", "16", "--eval-every", "2", "--eval-episodes", "4",
            "--checkpoint-every", "2", "--no-progress", "--seed", "1", "--target-return", "inf"]


def _cartpole_cmd(run_dir, generations, *extra):
    return [sys.executable, "-m", "eggroll.cli", "train", "cartpole", "--run-dir", str(run_dir),
            "--generations", str(generations), *CARTPOLE, *extra]


def _cartpole_reference(run_dir, generations, capsys):
    from eggroll import cli

    assert cli.main(_cartpole_cmd(run_dir, generations)[3:]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _checkpoint(run_dir):
    from eggroll.checkpoint import load_checkpoint
    from eggroll.recipes import cartpole as cp

    template = cp.make_train(cp.Config(hidden="8", population=16, seed=1)).init()
    return load_checkpoint(Path(run_dir) / "checkpoint", template)


def _last_json(log):
    return json.loads([ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1])


@pytest.mark.slow
@pytest.mark.parametrize("processes, devices", [(2, 2), (4, 1)])
def test_cartpole_processes_match_single_process(tmp_path, capsys, processes, devices):
    ref = _cartpole_reference(tmp_path / "ref", 3, capsys)
    run = tmp_path / "multi"
    procs, logs = launch(_cartpole_cmd(run, 3), processes, devices, tmp_path, "c")
    wait_all(procs, logs)
    results = [_last_json(log) for log in logs]
    for r in results:
        assert r["processes"] == processes and r["devices"] == 4
        assert {k: r[k] for k in ("final_return", "env_steps")} == {k: ref[k] for k in ("final_return", "env_steps")}
    a, meta_a = _checkpoint(tmp_path / "ref")
    b, meta_b = _checkpoint(run)
    assert meta_a["generation"] == meta_b["generation"] == 3
    assert_trees_equal(a, b)
    # every record carries the per-process communication, measured from the compiled program:
    # 16 members x (f32 return + s32 episode length) / 4 devices per device
    from eggroll.runlog import read_metrics

    rec = [r for r in read_metrics(run) if r["generation"] > 0]
    assert len(rec) == 3
    assert all(r["comm_bytes_per_process"] == (16 // 4) * 8 * devices for r in rec)
    assert results[0]["communication"]["comm_bytes_sent_per_process"] == 16 * 8 * (processes - 1) // processes


@pytest.mark.slow
def test_cartpole_kill_and_resume_matches_uninterrupted(tmp_path, capsys):
    run = tmp_path / "run"
    stopped_at = kill_one_after_checkpoint(_cartpole_cmd(run, 100000), run / "checkpoint" / "meta.json", tmp_path, "a")
    total = stopped_at + 2
    procs, logs = launch(_cartpole_cmd(run, total, "--resume"), 2, 2, tmp_path, "b")
    wait_all(procs, logs)
    ref = _cartpole_reference(tmp_path / "ref", total, capsys)
    a, meta_a = _checkpoint(tmp_path / "ref")
    b, meta_b = _checkpoint(run)
    assert meta_a["generation"] == meta_b["generation"] == total
    assert_trees_equal(a, b)
    assert _last_json(logs[0])["env_steps"] == ref["env_steps"]


# --------------------------------------------------------------------------- the scaling bench

def test_scaling_bench_rejects_bad_configs():
    from eggroll.bench import scaling

    with pytest.raises(ValueError, match="multiple"):
        scaling.run(scaling.Config(population=6, devices="1,4"))
    with pytest.raises(ValueError, match="positive"):
        scaling.run(scaling.Config(devices="0"))


@pytest.mark.slow
def test_scaling_bench_tiny():
    from eggroll.bench import scaling

    r = scaling.run(scaling.Config(width=64, width_small=16, population=16, reps=1, devices="1,2", processes=2))
    assert r["comm_independent_of_model_size"]
    assert r["comm"]["1dev"]["large"]["comm_bytes_per_process"] == 0  # one device: nothing to gather
    assert r["comm"]["2dev"]["large"]["comm_bytes_per_process"] == 16 * 4  # N float32 fitnesses
    assert r["comm"]["2proc"]["large"]["comm_bytes_per_process"] == 8 * 4  # each process: its half
    assert r["comm"]["2proc"]["large"]["comm_bytes_sent_per_process"] == 8 * 4
    assert r["comm"]["2proc"]["large"]["sgd_bf16_bytes"] == 2 * r["comm"]["2proc"]["large"]["num_params"]
    for row in r["scaling"].values():
        assert row["gen_ms"] > 0 and row["speedup"] > 0


def test_cli_refuses_multi_process_for_a_recipe_not_ready(capsys):
    from eggroll import cli

    # checked before jax.distributed starts: no coordinator is needed to see the refusal
    flags = ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0"]
    assert cli.main(["bench", "throughput", *flags]) == 2
    err = capsys.readouterr().err
    assert "does not support multi-process" in err and "eggroll train" in err
