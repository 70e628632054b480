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

The package, by concern (every name is re-exported here: use `distributed.X`):

    launch.py    Launch, resolve (flags / env / Slurm), initialize, finish, process_count / index
    watchdog.py  heartbeat watchdog, peer-failure detection, exit_now, exit_on_peer_failure
    replicas.py  replicate, host_fitness, replica checks, barrier, checkpoints, run_log, say
    comm.py      bytes sent through collectives, from a compiled program's HLO
"""

# the private names too: code and tests written against the former single module reach them here
from .comm import (  # noqa: F401
    _COLLECTIVES, _DTYPE_BYTES, _OP, _SHAPE, _group_size, collective_bytes, communication, hlo_communication,
    loop_collective_bytes,
)
from .launch import (  # noqa: F401
    DEFAULT_PEER_TIMEOUT, ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PORT, ENV_PROCESS_ID, Launch, _as_int,
    _first_env, _slurm, _state, finish, first_slurm_host, initialize, is_main_process, launch_info,
    process_count, process_index, resolve,
)
from .replicas import (  # noqa: F401
    _meta_hash, allgather_host, barrier, main_first, check_replicas_agree, checkpoint_exists, fingerprint, host_fitness,
    load_checkpoint, local_members, replicate, run_log, save_checkpoint, say,
)
from .watchdog import (  # noqa: F401
    EXIT_PEER_LOST, _PEER_ERRORS, _Watchdog, _die, _try_get, exit_now, exit_on_peer_failure, is_peer_failure,
    peer_lost_message,
)

__all__ = [
    "DEFAULT_PEER_TIMEOUT", "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PORT", "ENV_PROCESS_ID",
    "EXIT_PEER_LOST", "Launch", "allgather_host", "barrier", "main_first", "check_replicas_agree", "checkpoint_exists",
    "collective_bytes", "hlo_communication", "loop_collective_bytes", "communication", "exit_now", "exit_on_peer_failure", "fingerprint", "finish",
    "first_slurm_host", "host_fitness", "initialize", "is_main_process", "is_peer_failure", "launch_info",
    "load_checkpoint", "local_members", "peer_lost_message", "process_count", "process_index",
    "replicate", "resolve", "run_log", "save_checkpoint", "say",
]
