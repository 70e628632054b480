"""Placement, host-side gathers, checkpoints and logging for a multi-process run.

Every process holds the same replicated state (`replicate`); `host_fitness` evaluates a non-JAX
fitness on this process's shard of the population (`local_members`) and all-gathers the results
(`allgather_host`); `check_replicas_agree` compares a 63-bit `fingerprint` of the state across
processes. Checkpoints: process 0 writes (`save_checkpoint`), every process reads and checks
(`load_checkpoint`, `checkpoint_exists`). `run_log` and `say` write and print on process 0 only.
With one process every function here is the plain single-process version.
"""

from __future__ import annotations

import hashlib
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .launch import _state, is_main_process, process_count, process_index

def replicate(tree, mesh=None):
    """Place every array of `tree` replicated on all devices of `mesh` (default: the population
    mesh over every process). Every process must pass the same values. One device: unchanged."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from ..population import population_mesh

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
    from ..population import AXIS, population_mesh

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
    from .. import checkpoint

    if check:
        check_replicas_agree(tree, "parameters / optimizer / ES state")
    if is_main_process():
        checkpoint.save_checkpoint(directory, tree, metadata)  # replicated arrays: reads the local copy
    barrier("checkpoint")


def checkpoint_exists(directory) -> bool:
    """Whether `directory` holds a checkpoint: the same answer on every process, or an error
    naming the processes that cannot see it. Every process must call it."""
    from .. import checkpoint

    has = checkpoint.checkpoint_exists(directory)
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
    from .. import checkpoint

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


def main_first(fn: Callable[[], Any]):
    """fn() on process 0 first, then on the others (after a barrier): for work that fills a
    shared cache, such as converting a corpus, which the others then only read."""
    if process_count() == 1:
        return fn()
    if is_main_process():
        out = fn()
        barrier("main_first")
        return out
    barrier("main_first")
    return fn()


def run_log(run_dir, **kwargs):
    """A runlog.RunLog that writes and shows progress on process 0 only (write=False elsewhere:
    same clock and methods, no files; its wall clock on a resume comes from `wall_offset`)."""
    from ..runlog import RunLog

    return RunLog(run_dir, write=is_main_process(), **kwargs)


def say(*args) -> None:
    """print(..., file=sys.stderr) on process 0 only."""
    if is_main_process():
        print(*args, file=sys.stderr)
