"""Where this process sits in a multi-process run, and starting jax.distributed.

    launch = distributed.resolve(coordinator, num_processes, process_id)   # flags / env / Slurm
    distributed.initialize(launch)            # before anything touches a device

`resolve` takes the flags first, then EGGROLL_* / JAX_* environment variables, then a Slurm job
step with several tasks, else one process. `initialize` starts jax.distributed (gloo collectives
on CPU) and the heartbeat watchdog (distributed/watchdog.py); `finish` stops it once the run is
done. `_state` holds this process's Launch, its watchdog and the barrier counter: the package's
only mutable state, shared by its modules.
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

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
                               # jax's own heartbeat aborts the process; ours (watchdog.py) fires first and
                               # says why, so jax's is only the backstop
                               heartbeat_timeout_seconds=int(peer_timeout) + 15)
    from .watchdog import _Watchdog  # imported here: watchdog.py imports this module

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


def finish() -> None:
    """Call once the run is done on this process (the CLI does): stop watching the peers."""
    dog = _state.get("watchdog")
    if dog is not None:
        dog.finish()
        _state["watchdog"] = None
