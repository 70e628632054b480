"""Multi-process (multi-host) training on jax.distributed, where only fitness crosses the network.

Every process runs the same program (JAX's multi-controller model). The population is split over
all devices of all processes on one mesh axis (`population.population_mesh()`); each device
evaluates its members, the fitness vector (N numbers) is all-gathered, and every device applies
the identical update to its own replica of the parameters: no gradient or weight ever moves.

    launch = distributed.resolve(coordinator, num_processes, process_id)   # flags / env / Slurm
    distributed.initialize(launch)            # before anything touches a device

The contract for a recipe (docs/DISTRIBUTED.md) is small: build the state with `replicate`,
evaluate with `evaluate_population` (its default mesh spans every process), log through
`run_log` and write checkpoints with `save_checkpoint` (process 0 writes, every process checks
that its replica agrees) and read them with `load_checkpoint` (every process reads; they must
agree). `host_fitness` evaluates a non-JAX fitness (plain Python on host CPUs) per process on its
shard of the population and all-gathers the results.

Failure behaviour: a peer that dies makes every collective fail ("connection closed"), which
`exit_on_peer_failure` turns into one clear line and exit status 3; a peer that hangs or a
machine that vanishes stops its heartbeat, which the watchdog started by `initialize` notices
within `peer_timeout` seconds (same message, same status). JAX's own heartbeat is the backstop.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

EXIT_PEER_LOST = 3  # exit status of a process whose peer died or hung
DEFAULT_PEER_TIMEOUT = 30.0
ENV_COORDINATOR = ("EGGROLL_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = ("EGGROLL_NUM_PROCESSES", "JAX_NUM_PROCESSES")
ENV_PROCESS_ID = ("EGGROLL_PROCESS_ID", "JAX_PROCESS_ID")
ENV_PORT = "EGGROLL_PORT"  # coordinator port under Slurm (default: derived from the job id)


class Launch(NamedTuple):
    """Where this process sits in a run. source: 'flags', 'env', 'slurm' or 'single'."""

    coordinator: str | None
    num_processes: int
    process_id: int
    source: str


def _first_env(environ, names):
    for n in names:
        if environ.get(n, "").strip():
            return environ[n].strip(), n
    return None, None


def _as_int(value, what, where):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {value!r} (from {where})") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-007,012],cpu1' -> 'gpu003'."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]*)\])?", nodelist)
    if not m or not m.group(1):
        raise ValueError(f"cannot parse the Slurm node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    return prefix + re.split(r"[,-]", ranges)[0]


def _slurm(environ) -> Launch | None:
    need = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")
    if not all(environ.get(k) for k in need):
        return None
    ntasks = _as_int(environ["SLURM_NTASKS"], "SLURM_NTASKS", "Slurm")
    if ntasks <= 1:
        return None
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if not nodes:
        raise ValueError("Slurm job with several tasks but no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST; "
                         "pass --coordinator HOST:PORT explicitly")
    job = _as_int(environ["SLURM_JOB_ID"].split("_")[0], "SLURM_JOB_ID", "Slurm")
    port = environ.get(ENV_PORT) or str(20000 + job % 20000)  # one port per job, same on every task
    return Launch(f"{first_slurm_host(nodes)}:{port}", ntasks,
                  _as_int(environ["SLURM_PROCID"], "SLURM_PROCID", "Slurm"), "slurm")


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, environ=None) -> Launch:
    """Flags first, then EGGROLL_* / JAX_* environment variables, then Slurm; else one process."""
    environ = os.environ if environ is None else environ
    source = "flags" if coordinator or num_processes is not None or process_id is not None else None
    for value, names, what in ((coordinator, ENV_COORDINATOR, "coordinator"),
                               (num_processes, ENV_NUM_PROCESSES, "num_processes"),
                               (process_id, ENV_PROCESS_ID, "process_id")):
        if value is None or value == "":
            env_value, name = _first_env(environ, names)
            if env_value is not None:
                source = source or "env"
                value = env_value if what == "coordinator" else _as_int(env_value, what, name)
        if what == "coordinator":
            coordinator = value or None
        elif what == "num_processes":
            num_processes = value
        else:
            process_id = value
    if source is None:
        slurm = _slurm(environ)
        if slurm is not None:
            return slurm
        return Launch(None, 1, 0, "single")
    num_processes = 1 if num_processes is None else int(num_processes)
    if num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    if num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(f"--process-id {process_id} needs --num-processes > {process_id}")
        return Launch(coordinator, 1, 0, source)
    if not coordinator:
        raise ValueError(f"{num_processes} processes need --coordinator HOST:PORT (the address of process 0), "
                         f"or {ENV_COORDINATOR[0]}")
    if process_id is None:
        raise ValueError(f"{num_processes} processes need --process-id I (0..{num_processes - 1}) on each, "
                         f"or {ENV_PROCESS_ID[0]}")
    if not 0 <= int(process_id) < num_processes:
        raise ValueError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    return Launch(coordinator, num_processes, int(process_id), source)


# ---------------------------------------------------------------------------------------------
# initialisation, heartbeat watchdog, failure handling

_state: dict[str, Any] = {"launch": Launch(None, 1, 0, "single"), "watchdog": None}


def initialize(launch: Launch, *, peer_timeout: float = DEFAULT_PEER_TIMEOUT,
               init_timeout: int = 300) -> Launch:
    """jax.distributed.initialize for a multi-process launch (a no-op for one process).

    Must run before anything creates a device array. CPU collectives use gloo (jax's default
    on CPU). peer_timeout: seconds without a peer's heartbeat before this process gives up."""
    _state["launch"] = launch
    if launch.num_processes == 1:
        return launch
    import jax

    if not peer_timeout > 0:
        raise ValueError(f"peer_timeout must be > 0 seconds, got {peer_timeout}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                               cluster_detection_method="deactivate", initialization_timeout=init_timeout,
                               # jax's own heartbeat aborts the process; ours (below) fires first and
                               # says why, so jax's is only the backstop
                               heartbeat_timeout_seconds=int(peer_timeout) + 15)
    dog = _Watchdog(launch, float(peer_timeout))
    dog.start()
    _state["watchdog"] = dog
    return launch


def launch_info() -> Launch:
    return _state["launch"]


def process_count() -> int:
    import jax

    return jax.process_count()


def process_index() -> int:
    import jax

    return jax.process_index()


def is_main_process() -> bool:
    """True on process 0 (the only one that writes files or prints progress)."""
    return process_index() == 0


def _die(msg: str) -> None:
    """One clear line on stderr, then exit at once: jax's shutdown barrier would wait for the
    dead peer (and then abort with a C++ stack trace)."""
    try:
        sys.stdout.flush()
        sys.stderr.write(f"eggroll: error: {msg}\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_PEER_LOST)


def peer_lost_message(detail: str) -> str:
    launch = launch_info()
    return (f"process {launch.process_id} of {launch.num_processes} lost a peer ({detail}). Another "
            "process died or the network failed; this process stops too. Restart every process with "
            "--resume to continue from the last checkpoint.")


class _Watchdog(threading.Thread):
    """Each process bumps its own counter in the coordinator's key-value store every `period` s
    and checks that every peer's counter moved within `timeout` s. A process that finished
    cleanly says so (key 'done') and is no longer watched."""

    def __init__(self, launch: Launch, timeout: float):
        super().__init__(name="eggroll-heartbeat", daemon=True)
        self.launch, self.timeout = launch, timeout
        self.period = max(0.2, min(2.0, timeout / 10))
        self.stopped = threading.Event()

    def run(self):
        from jax._src import distributed as jd

        client = jd.global_state.client
        me, n = self.launch.process_id, self.launch.num_processes
        seen = {q: (None, time.monotonic()) for q in range(n) if q != me}
        last_ok, beat = time.monotonic(), 0
        while not self.stopped.wait(self.period):
            now = time.monotonic()
            try:
                client.key_value_set(f"eggroll/hb/{me}", str(beat), allow_overwrite=True)
                beat += 1
                last_ok = now
            except Exception as e:  # the coordinator (process 0) is gone or unreachable
                if now - last_ok > self.timeout and not self.stopped.is_set():
                    _die(peer_lost_message(f"the coordinator {self.launch.coordinator} has not answered "
                                           f"for {self.timeout:.0f} s: {str(e).splitlines()[0][:200]}"))
                continue
            for q in list(seen):
                try:
                    if _try_get(client, f"eggroll/done/{q}") is not None:
                        del seen[q]
                        continue
                    value = _try_get(client, f"eggroll/hb/{q}")
                except Exception:
                    continue  # judged by the coordinator check above
                old, t = seen[q]
                if value != old:
                    seen[q] = (value, now)
                elif now - t > self.timeout and not self.stopped.is_set():
                    _die(peer_lost_message(f"process {q} has sent no heartbeat for {self.timeout:.0f} s"))

    def finish(self):
        """Say 'done' (peers stop watching this process) and stop."""
        self.stopped.set()
        from jax._src import distributed as jd

        with contextlib.suppress(Exception):
            jd.global_state.client.key_value_set(f"eggroll/done/{self.launch.process_id}", "1",
                                                 allow_overwrite=True)


def _try_get(client, key):
    try:
        return client.key_value_try_get(key)
    except Exception as e:
        if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
            return None
        raise


def finish() -> None:
    """Call once the run is done on this process (the CLI does): stop watching the peers."""
    dog = _state.get("watchdog")
    if dog is not None:
        dog.finish()
        _state["watchdog"] = None


_PEER_ERRORS = ("gloo", "connection closed", "connection reset", "coordination", "heartbeat",
                "unavailable", "broken pipe", "socket closed")


def is_peer_failure(e: BaseException) -> bool:
    """Did this exception come from a collective / the coordinator losing a peer?"""
    text = f"{type(e).__name__}: {e}".lower()
    return type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and any(s in text for s in _PEER_ERRORS)


def exit_now(code: int, message: str | None = None) -> None:
    """Flush, print `message` (one line) on stderr and leave at once with `code`. In a
    multi-process run a process must not wait in jax's shutdown barrier for peers that may be
    waiting for it in a collective."""
    sys.stdout.flush()
    if message:
        sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def exit_on_peer_failure(label: str = "eggroll"):
    """For library users: in a multi-process run, a collective that fails because a peer went
    away becomes one clear line and exit status 3; any other exception its traceback and exit
    status 1, without waiting in the shutdown barrier. With one process it does nothing."""
    try:
        yield
    except Exception as e:
        if launch_info().num_processes == 1:
            raise
        if is_peer_failure(e):
            _die(peer_lost_message(f"a collective failed: {str(e).splitlines()[0][:300]}"))
        import traceback

        traceback.print_exc()
        exit_now(1, f"{label}: error on process {launch_info().process_id}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:300] if str(e) else ''}")


# ---------------------------------------------------------------------------------------------
# placement, host-side gathers, checkpoints, logging

def replicate(tree, mesh=None):
    """Place every array of `tree` replicated on all devices of `mesh` (default: the population
    mesh over every process). Every process must pass the same values. One device: unchanged."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from .population import population_mesh

    mesh = population_mesh() if mesh is None else mesh
    if mesh.size == 1:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def allgather_host(x: np.ndarray) -> np.ndarray:
    """(P, *x.shape): every process's `x` (same shape and dtype on each), stacked by process."""
    x = np.asarray(x)
    if process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def local_members(population: int, mesh=None) -> np.ndarray:
    """The member indices this process evaluates: those of its devices on the population mesh
    (a contiguous block when every process has the same number of devices)."""
    from .population import AXIS, population_mesh

    mesh = population_mesh() if mesh is None else mesh
    devices = list(mesh.devices.reshape(-1))
    n_dev = len(devices)
    if population % n_dev:
        raise ValueError(f"population {population} is not divisible by the {n_dev} devices of the mesh")
    per = population // n_dev
    me = process_index()
    idx = [np.arange(i * per, (i + 1) * per) for i, d in enumerate(devices) if d.process_index == me]
    assert mesh.axis_names == (AXIS,)
    return np.concatenate(idx).astype(np.int32)


def host_fitness(fn: Callable[[np.ndarray], Any], population: int, mesh=None) -> np.ndarray:
    """Evaluate a host (non-JAX) fitness for the whole population, each process on its shard.

    fn(members) -> array of shape (len(members), ...): plain Python / NumPy / a simulator / a
    reward parser, run on this process's CPUs for the members `local_members` gives it. The
    shards are all-gathered (the only traffic: the results), so every process returns the same
    (population, ...) array, ready for es.tell."""
    members = local_members(population, mesh)
    local = np.asarray(fn(members))
    if local.shape[:1] != members.shape:
        raise ValueError(f"host fitness returned shape {local.shape} for {len(members)} members; "
                         f"expected ({len(members)}, ...)")
    if process_count() == 1:
        return local
    gathered = allgather_host(local)  # (P, per_process, ...)
    order = allgather_host(members)  # where each process's members go
    out = np.empty((population, *local.shape[1:]), local.dtype)
    out[order.reshape(-1)] = gathered.reshape(-1, *local.shape[1:])
    return out


def fingerprint(tree) -> int:
    """A 63-bit hash of every array in `tree` (bytes, shapes, dtypes); equal trees, equal hashes."""
    import jax

    h = hashlib.blake2b(digest_size=8)
    for x in jax.tree_util.tree_leaves(tree):
        a = np.asarray(jax.device_get(x))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def check_replicas_agree(tree, what: str = "state") -> None:
    """Raise if the processes hold different values of `tree` (8 bytes per process cross)."""
    if process_count() == 1:
        return
    prints = allgather_host(np.asarray([fingerprint(tree)], np.int64)).reshape(-1)
    if len(set(prints.tolist())) > 1:
        raise RuntimeError(f"the processes hold different {what} (fingerprints {prints.tolist()}): "
                           "the run is not deterministic across processes")


def save_checkpoint(directory, tree, metadata: dict | None = None, *, check: bool = True):
    """Process 0 writes the checkpoint (checkpoint.save_checkpoint); every process first checks
    that all replicas agree. Every process must call it (it is a collective)."""
    from . import checkpoint

    if check:
        check_replicas_agree(tree, "parameters / optimizer / ES state")
    if is_main_process():
        checkpoint.save_checkpoint(directory, tree, metadata)  # replicated arrays: reads the local copy
    barrier("checkpoint")


def checkpoint_exists(directory) -> bool:
    """Whether `directory` holds a checkpoint: the same answer on every process, or an error
    naming the processes that cannot see it. Every process must call it."""
    has = (Path(directory) / "arrays.safetensors").exists()
    if process_count() == 1:
        return has
    flags = allgather_host(np.asarray([has], np.int32)).reshape(-1)
    if flags.any() and not flags.all():
        missing = [i for i, f in enumerate(flags.tolist()) if not f]
        raise FileNotFoundError(
            f"checkpoint {directory} exists on some processes but not on process(es) {missing}: "
            "use a shared filesystem or copy the run directory to every machine before --resume")
    return bool(flags.all())


def load_checkpoint(directory, template):
    """Every process reads `directory` (a shared filesystem, or a copy on each machine) and the
    processes check that they read the same thing. Every process must call it."""
    from . import checkpoint

    directory = Path(directory)
    checkpoint_exists(directory)  # a clear error if some process cannot see it
    tree, meta = checkpoint.load_checkpoint(directory, template)
    check_replicas_agree((tree, _meta_hash(meta)), f"checkpoint {directory}")
    return tree, meta


def _meta_hash(meta) -> np.ndarray:
    import json

    return np.asarray(zlib.crc32(json.dumps(meta, sort_keys=True).encode()), np.uint32)


def barrier(name: str, timeout_s: float = 600.0) -> None:
    """All processes wait here (through the coordinator; no device collective)."""
    if process_count() == 1:
        return
    from jax._src import distributed as jd

    _state["barriers"] = _state.get("barriers", 0) + 1
    jd.global_state.client.wait_at_barrier(f"eggroll/{name}/{_state['barriers']}", int(timeout_s * 1000))


def run_log(run_dir, **kwargs):
    """A runlog.RunLog that writes and shows progress on process 0 only (write=False elsewhere:
    same clock and methods, no files; its wall clock on a resume comes from `wall_offset`)."""
    from .runlog import RunLog

    return RunLog(run_dir, write=is_main_process(), **kwargs)


def say(*args) -> None:
    """print(..., file=sys.stderr) on process 0 only."""
    if is_main_process():
        print(*args, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# communication accounting

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                "collective-broadcast")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(")


def _group_size(line: str) -> int:
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    m = re.search(r"replica_groups=\[\d+,(\d+)\]", line)  # iota form [groups,size]<=[...]
    return int(m.group(1)) if m else 1


def collective_bytes(hlo_text: str) -> dict:
    """Bytes each device puts into cross-device collectives in one run of a compiled XLA
    program (`jitted.lower(...).compile().as_text()`), by collective kind. From each op's result
    shape: an all-gather over g devices takes result/g from each; a reduce-scatter result*g; an
    all-reduce, all-to-all or permute its result's size. Async '-start' ops count once, by the
    outputs half of their tuple."""
    out: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        op, result = m.group(2), m.group(1)
        shapes = _SHAPE.findall(result)
        if m.group(3):  # (operands..., outputs...)
            shapes = shapes[len(shapes) // 2:]
        size = sum(_DTYPE_BYTES.get(t, 0) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                   for t, dims in shapes)
        g = _group_size(line)
        if op == "all-gather":
            size //= max(g, 1)
        elif op == "reduce-scatter":
            size *= g
        out[op] = out.get(op, 0) + size
    return out


def communication(jitted, *args, n_params: int | None = None, mesh=None) -> dict:
    """Per-generation traffic of a jitted generation function, from its compiled program.

    bytes_per_device: what one device contributes to collectives (its members' fitness etc.);
    bytes_per_process: that times the devices of one process (what leaves the process);
    bytes_ring_per_process: what a ring all-gather makes each process send, (P-1)/P of the
    gathered total, i.e. ~N x bytes per member; sgd_bf16_bytes: 2 bytes x n_params, the gradient
    a data-parallel SGD step all-reduces (a ring all-reduce sends about twice that)."""
    from .population import population_mesh

    mesh = population_mesh() if mesh is None else mesh
    per_dev = collective_bytes(jitted.lower(*args).compile().as_text())
    dev = sum(per_dev.values())
    n_dev = mesh.size
    local = sum(1 for d in mesh.devices.reshape(-1) if d.process_index == process_index())
    procs = len({d.process_index for d in mesh.devices.reshape(-1)})
    out = {"comm_bytes_per_device": dev, "comm_bytes_per_process": dev * local,
           "comm_bytes_sent_per_process": (dev * n_dev) * (procs - 1) // max(procs, 1),
           "comm_by_kind": per_dev}
    if n_params is not None:
        out["sgd_bf16_bytes"] = 2 * int(n_params)
    return out
