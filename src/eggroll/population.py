"""Evaluate a fitness function over a population: vmap in a chunk, lax.map over chunks, and a
mesh axis over devices.

    fitness = evaluate_population(fitness_fn, N, chunk=64)   # fitness_fn(member) -> pytree

Member m's result depends only on m (its noise is addressed by its index), so results do not
depend on the chunk size or device count; the only thing that crosses devices is the all-gather
of the results (N scalars per fitness output), after which every device holds the full vector
and computes the same update.

Several processes (jax.distributed, see eggroll.distributed): the default mesh spans the devices
of every process (jax.devices()), in process order, so process p evaluates a contiguous block of
members and the all-gather is the only cross-host traffic. Inputs must then be replicated on
that mesh (eggroll.distributed.replicate). With one process jax.devices() is the local devices.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec as P

from .noise import consecutive_members, largest_divisor_at_most

try:  # jax >= 0.7
    from jax import shard_map as _shard_map
except ImportError:  # pragma: no cover - jax 0.6
    from jax.experimental.shard_map import shard_map as _shard_map

AXIS = "population"
# The all-gathered output is replicated by construction; older/newer jax spell the flag that
# skips re-proving it differently (check_rep in <= 0.6, check_vma after).
_NO_CHECK = {"check_vma": False} if "check_vma" in inspect.signature(_shard_map).parameters else {"check_rep": False}


def shard_map_unchecked(fn: Callable, *, mesh: Mesh, in_specs, out_specs):
    """jax's shard_map without re-proving replication of the outputs (the callers' collectives
    make them replicated by construction); one spelling for every jax version."""
    return _shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **_NO_CHECK)


def device_sum(tree, axis: str, n: int):
    """The sum over the n devices of mesh axis `axis` (inside shard_map), in an order fixed by
    the device indices alone, so the bits do not depend on how the devices are spread over
    processes (XLA's psum adds in an order that does: in-process vs gloo differ in the last bit).

    n a power of 2: recursive doubling, log2(n) exchanges; in round k device i adds its value and
    that of device i xor 2^k (x_i + x_j == x_j + x_i exactly, so partners agree): one fixed tree,
    ((x0 + x1) + (x2 + x3)) + ... Otherwise: all-gather, then x0 + x1 + ... in index order."""
    flat, unravel = ravel_pytree(tree)  # one message per exchange, not one per leaf
    if n & (n - 1) == 0:
        k = 1
        while k < n:
            flat = flat + lax.ppermute(flat, axis, [(i, i ^ k) for i in range(n)])
            k *= 2
        return unravel(flat)
    g = lax.all_gather(flat, axis)  # [n, size]
    return unravel(functools.reduce(lambda total, i: total + g[i], range(1, n), g[0]))


def population_mesh(devices: Sequence | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process) with axis name
    'population'."""
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), (AXIS,))


def _map_chunks(fitness_fn, members, chunk):
    """vmap over each chunk of consecutive members, lax.map over the chunks. Each chunk is declared
    a run (noise.consecutive_members), so es.noise may draw the chunk's noise at once."""
    def run(ms):
        with consecutive_members(ms):
            return jax.vmap(fitness_fn)(ms)

    n = members.shape[0]
    if chunk is None or chunk >= n:
        return run(members)
    out = lax.map(run, members.reshape(n // chunk, chunk))
    return jax.tree_util.tree_map(lambda x: x.reshape(n, *x.shape[2:]), out)


# Members per vmap chunk when none is given: a chunk's activations and noise then stay in the
# caches. Measured on the quiet 2-core CPU (`eggroll bench throughput --chunk C`, 4,096 members,
# 3-layer MLP): width 256, forward / inference 0.41 in one batch, 0.56 / 0.69 / 0.73 in chunks of
# 256 / 1,024 / 2,048; width 1024, 0.65 in one batch, 0.86-0.89 in chunks of 256-1,024.
DEFAULT_CHUNK = 1024
_MIN_AUTO_CHUNK = 256  # smaller chunks can round differently from one batch (last bit; MLPs of width < 64)


def default_chunk(local: int) -> int | None:
    """The automatic chunk for `local` members on a device: the largest divisor <= DEFAULT_CHUNK,
    or None (all at once) when local <= DEFAULT_CHUNK or no divisor is >= _MIN_AUTO_CHUNK."""
    if local <= DEFAULT_CHUNK:
        return None
    c = largest_divisor_at_most(local, DEFAULT_CHUNK)
    return c if c >= _MIN_AUTO_CHUNK else None


def evaluate_population(fitness_fn: Callable, population: int, *, chunk: int | None = None,
                        mesh: Mesh | None = None, devices: Sequence | None = None):
    """Results of fitness_fn(member) for member = 0..population-1, stacked on axis 0.

    chunk: members evaluated together by vmap on one device; must divide population / n_devices.
    None: automatic (`default_chunk`: at most 1,024 members; all of a device's share when that is
    smaller); pass the per-device population for one batch. Member results do not depend on it
    beyond float rounding (bitwise for chunks of 256 members or more in the MLP tests; smaller
    chunks of narrow MLPs can differ in the last bit). mesh / devices: where to shard the
    population (default every device of every process). Call it inside jit: the whole generation
    compiles to one program."""
    if mesh is None:
        mesh = population_mesh(devices)
    n_dev = mesh.shape[AXIS]
    if population % n_dev:
        raise ValueError(f"population {population} is not divisible by the {n_dev} devices; "
                         f"use a multiple of {n_dev} or pass devices=")
    local = population // n_dev
    if chunk is not None and (chunk < 1 or local % chunk):
        raise ValueError(f"chunk {chunk} must divide the per-device population {local} "
                         f"(population {population} over {n_dev} devices)")
    chunk = default_chunk(local) if chunk is None else chunk
    members = jnp.arange(population, dtype=jnp.int32)
    if n_dev == 1:
        return _map_chunks(fitness_fn, members, chunk)

    def shard(ms):
        out = _map_chunks(fitness_fn, ms, chunk)
        return jax.tree_util.tree_map(lambda x: lax.all_gather(x, AXIS, tiled=True), out)

    return shard_map_unchecked(shard, mesh=mesh, in_specs=P(AXIS), out_specs=P())(members)
