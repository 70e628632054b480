"""The shared noise table: where the standard normals of `noise.draw` come from by default.

A table of float32 standard normals is made once from the base key (a deterministic function of
(key, size); never checkpointed). A member's draw is the contiguous slice at `table_offset`: a
random base per (leaf, epoch) plus pair x slice size, so one generation's directions of a leaf
read disjoint slices (Salimans et al. 2017's shared noise table). Sizing rules: noise.required_table_size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Smallest default table: 2^20 float32 normals (4 MiB), small enough to stay in a CPU's cache
# (the table is read at random offsets every generation: a 64 MiB table costs the population
# forward ~5% on a 2-core CPU in DRAM traffic alone). It grows with the largest slice and with
# the number of noise directions per generation (see required_table_size).
DEFAULT_TABLE_SIZE = 1 << 20
# the default table holds >= this many entries per noise direction of a generation, so the
# random bases of different leaves and epochs rarely line up slice for slice
_ENTRIES_PER_DIRECTION = 256
_NON_OVERLAP_CAP = 1 << 24  # 64 MiB: beyond it slices of one generation may overlap (shifted)
_TABLE_SALT = 0x7AB1E


@functools.partial(jax.jit, static_argnums=1)
def _normal_table(key: jax.Array, size: int) -> jax.Array:
    return jax.random.normal(jax.random.fold_in(key, _TABLE_SALT), (size,))


def make_table(key: jax.Array, size: int) -> jax.Array:
    """The shared table of standard normals: a deterministic function of (key, size).

    A fresh buffer each call (not cached), so a caller may donate its state's table."""
    return _normal_table(jnp.asarray(key, jnp.uint32), int(size))


def table_offset(lkey, epoch, pair, span, stride):
    """Start of the table slice addressed by (leaf key, epoch, pair), in [0, span):

        offset = (base + pair * stride) mod span,   base = randint(fold_in(leaf key, epoch), [0, span))

    With stride = the slice size, the pairs of one leaf and epoch read consecutive,
    non-overlapping slices (while pairs * stride <= span), so within a generation no two noise
    directions of a leaf share a table entry; each leaf and epoch starts at its own random base.
    Only the base is hashed (once per leaf and epoch, not per member); the per-member part is
    one multiply-add, cheap enough for XLA to fuse into the gathers.

    Broadcasts: lkey (..., 2); span and stride broadcast with lkey[..., 0]; pair with the result.
    Arithmetic is uint32 (wrapping), then reduced mod span (< 2**31)."""
    lkey = jnp.asarray(lkey, jnp.uint32)
    batch = lkey.shape[:-1]
    span = jnp.broadcast_to(jnp.asarray(span, jnp.int32), batch)
    base = jax.vmap(lambda k, s: jax.random.randint(jax.random.fold_in(k, epoch), (), 0, s))(
        lkey.reshape(-1, 2), span.reshape(-1)).reshape(batch)
    u32 = jnp.uint32
    step = jnp.asarray(pair).astype(u32) * jnp.asarray(stride).astype(u32)
    return ((base.astype(u32) + step) % span.astype(u32)).astype(jnp.int32)


def table_span(table, size: int) -> int:
    return int(table.shape[0]) - int(size) + 1


def draw_at(table, offset, size: int) -> jax.Array:
    """`size` consecutive table entries from `offset`."""
    return lax.dynamic_slice(table, (offset,), (size,))


def lowrank_at(table, offset, shape: tuple, rank: int):
    """split_factors(draw_at(table, offset, (d0 + d1) * rank), shape, rank) as two slices, so
    each factor is gathered straight into its consumer (no slice of a gathered copy)."""
    d0, d1 = shape
    a = lax.dynamic_slice(table, (offset,), (d0 * rank,)).reshape(rank, d0).T
    b = lax.dynamic_slice(table, (offset + d0 * rank,), (d1 * rank,)).reshape(rank, d1).T
    return a, b
