"""Noise addressing: (key, parameter path, generation, member) -> the perturbation of one parameter.

Noise is never stored. One pure function, `draw`, maps

    (leaf key = fold_in(base key, hash(parameter path)), epoch, pair) -> standard normals

and both the population forward pass (`member_noise`) and the ES update (`strategy.tell`) call
it, so they always agree. Here

    epoch = generation // noise_reuse     (0 when noise_reuse == 0: never refresh)
    pair  = member // 2, sign = +1 for even members, -1 for odd   (antithetic)
    pair  = member,      sign = +1                                 (antithetic=False)

A parameter's noise is one of
    LowRank(a, b, scale): perturbation  scale * a @ b.T,  a (d0, r), b (d1, r),
                          scale = sign * sigma / sqrt(r), so entries of a b^T / sqrt(r) have
                          unit variance, like full-rank Gaussian noise.
    Full(eps, scale):     perturbation  scale * eps,  eps ~ N(0, I) of the parameter's shape,
                          scale = sign * sigma.
    None:                 frozen parameter.

Sources of standard normals:
    "table"    (default) a shared table of normals made once from the base key; one member's
               draw is a contiguous slice at a key-derived offset (Salimans et al. 2017). All
               members' factors come from one gather: far cheaper than a threefry draw each.
               The offset is `table_offset`: a random base per (leaf, epoch) plus pair x slice
               size, so one generation's directions of a leaf never share a table entry
               (noise_table.py).
    "threefry" jax.random.normal per (leaf, epoch, pair): exact i.i.d. draws, slower.

`draw` is the reference definition; the forward (`member_noise`, via the bucketed
`member_directions`) and every strategy's update (`direction_sums`) call `direction_noise`,
which yields exactly `draw`'s values. `NoiseContext` holds what is constant for a run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .noise_table import (  # noqa: F401  (re-exported: the table is part of noise addressing)
    _ENTRIES_PER_DIRECTION, _NON_OVERLAP_CAP, DEFAULT_TABLE_SIZE, draw_at, lowrank_at, make_table, table_offset,
    table_span,
)

LOWRANK, FULL, FROZEN = "lowrank", "full", "frozen"
KINDS = (LOWRANK, FULL, FROZEN)
SOURCES = ("table", "threefry")
class LowRank(NamedTuple):
    """Rank-r perturbation of a matrix parameter: scale * a @ b.T (never built in the hot path)."""

    a: jax.Array  # (d0, r)
    b: jax.Array  # (d1, r)
    scale: jax.Array  # sign * sigma / sqrt(r)

    def materialize(self) -> jax.Array:
        return self.scale * (self.a @ self.b.T)


class Full(NamedTuple):
    """Dense Gaussian perturbation of a parameter: scale * eps."""

    eps: jax.Array  # parameter's shape, N(0, 1)
    scale: jax.Array  # sign * sigma

    def materialize(self) -> jax.Array:
        return self.scale * self.eps


class LeafPlan(NamedTuple):
    """Static description of one parameter leaf (hashable, lives in the jit cache key)."""

    path: str
    shape: tuple
    dtype: str
    kind: str
    salt: int

    @property
    def draw_size(self) -> int:
        """How many standard normals one member's noise for this leaf needs (rank-free part)."""
        if self.kind == LOWRANK:
            return self.shape[0] + self.shape[1]
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class NoisePlan(NamedTuple):
    """Static noise settings plus the per-leaf plan of a parameter pytree."""

    treedef: Any
    leaves: tuple
    rank: int
    antithetic: bool
    noise_reuse: int
    source: str

    def size(self, leaf: LeafPlan) -> int:
        return leaf.draw_size * (self.rank if leaf.kind == LOWRANK else 1)


def path_salt(path: str) -> int:
    """Stable 31-bit integer for a parameter path (independent of dict order and Python hash seed)."""
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


def default_kind(path: str, leaf) -> str:
    """Matrices (2-D, embeddings included) get low-rank noise; everything else full noise."""
    return LOWRANK if jnp.ndim(leaf) == 2 else FULL


def make_plan(
    params,
    *,
    rank: int,
    antithetic: bool,
    noise_reuse: int,
    source: str,
    kinds: Callable[[str, Any], str] | Any | None = None,
    default: Callable[[str, Any], str] = default_kind,
) -> NoisePlan:
    """Build the static plan. `kinds` is a function (path, leaf) -> kind, or a pytree of kind
    strings with the same structure as params, or None for `default`."""
    if source not in SOURCES:
        raise ValueError(f"unknown noise source {source!r}; choose one of {SOURCES}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not isinstance(noise_reuse, int) or noise_reuse < 0:
        raise ValueError(f"noise_reuse must be an integer >= 0 (0 = never refresh), got {noise_reuse!r}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError("params has no array leaves to perturb")
    if kinds is None or callable(kinds):
        kind_fn = kinds or default
        kind_of = [kind_fn(jax.tree_util.keystr(p), x) for p, x in flat]
    else:
        kind_leaves, kind_def = jax.tree_util.tree_flatten(kinds)
        if kind_def != treedef:
            raise ValueError(
                "the kinds mask must have the same pytree structure as params "
                f"(got {kind_def}, expected {treedef}); or pass a function (path, leaf) -> kind"
            )
        kind_of = kind_leaves
    leaves = []
    for (path, x), kind in zip(flat, kind_of):
        name = jax.tree_util.keystr(path)
        if kind not in KINDS:
            raise ValueError(f"parameter {name}: unknown noise kind {kind!r}; choose one of {KINDS}")
        shape = tuple(int(s) for s in jnp.shape(x))
        if kind == LOWRANK:
            if len(shape) != 2:
                raise ValueError(f"parameter {name} has shape {shape}: low-rank noise needs a matrix")
            if rank > min(shape):
                raise ValueError(
                    f"rank {rank} exceeds min(m, n) = {min(shape)} of parameter {name} {shape}; "
                    "lower the rank or give this parameter full noise"
                )
        leaves.append(LeafPlan(name, shape, str(jnp.result_type(x)), kind, path_salt(name)))
    return NoisePlan(treedef, tuple(leaves), rank, antithetic, noise_reuse, source)


def required_table_size(plan: NoisePlan, table_size: int | None, n_dirs: int = 0) -> int:
    """Table size to use; every member's slice must fit with room for many distinct offsets.

    Default (table_size None): the smallest power of two >= DEFAULT_TABLE_SIZE, 16 x the largest
    slice, _ENTRIES_PER_DIRECTION x n_dirs (noise directions per generation) and, up to
    _NON_OVERLAP_CAP entries, n_dirs x the largest slice, so that one generation's directions of
    a leaf read disjoint slices (see table_offset)."""
    largest = max((plan.size(l) for l in plan.leaves if l.kind != FROZEN), default=1)
    if table_size is None:
        need = max(16 * largest, _ENTRIES_PER_DIRECTION * n_dirs, min(n_dirs * largest, _NON_OVERLAP_CAP), 1)
        return max(DEFAULT_TABLE_SIZE, 1 << math.ceil(math.log2(need)))
    if table_size < 8 * largest:
        raise ValueError(
            f"noise table of {table_size} values is too small for a slice of {largest} "
            f"(needs >= {8 * largest}); raise table_size or use noise_source='threefry'"
        )
    return int(table_size)


def leaf_key(key: jax.Array, leaf: LeafPlan) -> jax.Array:
    return jax.random.fold_in(key, leaf.salt)


def leaf_keys(key: jax.Array, leaves) -> jax.Array:
    """Stacked `leaf_key`s (L, 2) of several leaves in one vectorised fold_in."""
    salts = jnp.asarray([leaf.salt for leaf in leaves], jnp.uint32)
    return jax.vmap(jax.random.fold_in, (None, 0))(key, salts)


def draw(table, lkey, epoch, pair, size: int) -> jax.Array:
    """`size` standard normals addressed by (leaf key, epoch, pair). The single source of noise."""
    if table is None:
        k = jax.random.fold_in(jax.random.fold_in(lkey, epoch), pair)
        return jax.random.normal(k, (size,), jnp.float32)
    return draw_at(table, table_offset(lkey, epoch, pair, table_span(table, size), size), size)


def split_factors(v: jax.Array, shape: tuple, rank: int):
    """Flat draw (..., (d0 + d1) * r) -> a (..., d0, r), b (..., d1, r). Each factor is stored
    rank-major (column k of a is the k-th run of d0 values), so the update's contraction over
    (directions, rank) is one GEMM over contiguous rows and a rank-1 factor is the plain run."""
    d0, d1 = shape
    a = v[..., : d0 * rank].reshape(*v.shape[:-1], rank, d0)
    b = v[..., d0 * rank :].reshape(*v.shape[:-1], rank, d1)
    return jnp.swapaxes(a, -1, -2), jnp.swapaxes(b, -1, -2)


def lowrank_contract(a: jax.Array, b: jax.Array, acc_dtype) -> jax.Array:
    """sum over directions c and ranks k of a[l, c, :, k] b[l, c, :, k]^T: (L, d0, d1) from
    stacked factors a (L, c, d0, r), b (L, c, d1, r). For r > 1 the contraction runs over rows
    (direction, rank) in the order split_factors stores them (one GEMM, no transposed copy;
    measured 2x faster forward and update at rank 4); rank 1 keeps the plain contraction over c."""
    if a.shape[-1] == 1:
        return jnp.einsum("lcir,lcjr->lij", a, b, preferred_element_type=acc_dtype)
    rows = lambda f: jnp.swapaxes(f, -1, -2).reshape(f.shape[0], f.shape[1] * f.shape[3], f.shape[2])  # noqa: E731
    return jnp.einsum("lki,lkj->lij", rows(a), rows(b), preferred_element_type=acc_dtype)


def epoch_of(plan: NoisePlan, generation):
    return generation // plan.noise_reuse if plan.noise_reuse > 0 else jnp.zeros_like(generation)


def member_coords(plan: NoisePlan, member, dtype=jnp.float32):
    """member -> (pair index, antithetic sign as `dtype`: float32 for float noise, int32 for
    integer EGGROLL)."""
    member = jnp.asarray(member, jnp.int32)
    if plan.antithetic:
        return member // 2, (1 - 2 * (member % 2)).astype(dtype)
    return member, jnp.asarray(1, dtype)


def direction_noise(plan: NoisePlan, table, lkey, epoch, pair, leaf: LeafPlan):
    """Standard normals of noise direction `pair` for one (non-frozen) leaf: (a, b) for a
    low-rank leaf, eps of the leaf's shape otherwise. Equal to `draw` (split / reshaped); the
    forward (`member_noise`) calls it per member and the update (`strategy.tell`) vmaps it over
    leaves x pairs, so both read exactly the same noise. Low-rank factors are sliced straight
    from the table (no slice of a gathered copy)."""
    size = plan.size(leaf)
    if table is None:
        v = draw(None, lkey, epoch, pair, size)
        return split_factors(v, leaf.shape, plan.rank) if leaf.kind == LOWRANK else v.reshape(leaf.shape)
    offset = table_offset(lkey, epoch, pair, table_span(table, size), size)
    if leaf.kind == LOWRANK:
        return lowrank_at(table, offset, leaf.shape, plan.rank)
    return draw_at(table, offset, size).reshape(leaf.shape)


class NoiseContext:
    """What a strategy needs that never changes during a run: the base key (raw uint32[2]), the
    noise table (or None for threefry draws), the static plan, and `extra` constants (e.g. integer
    EGGROLL's threshold schedule). Built once by `es.setup(key, params)` from the seed; pass it
    into jitted code as an argument and never return it from a step, or XLA copies the table every
    call. It is never checkpointed: it is a function of the seed and the config."""

    def __init__(self, key, table, plan: NoisePlan, extra=None):
        self.key, self.table, self.plan, self.extra = key, table, plan, {} if extra is None else extra

    def __repr__(self):
        size = None if self.table is None else tuple(self.table.shape)
        return f"NoiseContext(leaves={len(self.plan.leaves)}, table={size}, extra={sorted(self.extra)})"


jax.tree_util.register_pytree_with_keys(
    NoiseContext,
    lambda c: (tuple((jax.tree_util.GetAttrKey(n), getattr(c, n)) for n in ("key", "table", "extra")), c.plan),
    lambda plan, children: NoiseContext(children[0], children[1], plan, children[2]),
    lambda c: ((c.key, c.table, c.extra), c.plan),
)


def largest_divisor_at_most(n: int, bound: int) -> int:
    """The largest divisor of n that is <= bound (>= 1): chunk sizes that tile a population."""
    for c in range(max(1, min(n, bound)), 0, -1):
        if n % c == 0:
            return c
    return 1


def leaf_buckets(plan: NoisePlan) -> list[list[int]]:
    """Indices of the perturbed leaves grouped by (kind, shape), in first-seen order. Leaves of a
    bucket differ only in their keys, so their noise is drawn by one vmapped `direction_noise`
    (one offset computation per distinct shape: compile time does not grow with depth)."""
    buckets: dict[tuple, list[int]] = {}
    for i, leaf in enumerate(plan.leaves):
        if leaf.kind != FROZEN:
            buckets.setdefault((leaf.kind, leaf.shape), []).append(i)
    return list(buckets.values())


def _bucket_noise(plan, table, lkeys, epoch, pairs, leaf):
    """direction_noise for (L leaf keys) x (pairs, any shape: vmapped over its leading axes)."""
    inner = direction_noise
    for _ in range(jnp.ndim(pairs)):
        inner = jax.vmap(inner, (None, None, None, None, 0, None))
    return jax.vmap(inner, (None, None, 0, None, None, None))(plan, table, lkeys, epoch, pairs, leaf)


def member_directions(plan: NoisePlan, key, table, epoch, pair) -> list:
    """Standard-normal (or integer-table) noise of direction `pair` for every leaf, in
    plan.leaves order (None for frozen leaves): (a, b) for low-rank leaves, eps otherwise.
    The one bucketed noise function: the forward of every strategy and the sampler call it, the
    update (`direction_sums`) draws the same values for chunks of pairs."""
    out: list = [None] * len(plan.leaves)
    for idx in leaf_buckets(plan):
        leaf = plan.leaves[idx[0]]
        if len(idx) == 1:
            out[idx[0]] = direction_noise(plan, table, leaf_key(key, leaf), epoch, pair, leaf)
            continue
        lkeys = leaf_keys(key, [plan.leaves[i] for i in idx])
        if table is None:  # threefry draws: one vmapped draw per bucket
            z = _bucket_noise(plan, table, lkeys, epoch, pair, leaf)
            for j, i in enumerate(idx):
                out[i] = jax.tree_util.tree_map(lambda x, j=j: x[j], z)
            continue
        # one vectorised offset hash per bucket; each leaf gathers its own slice straight into its
        # consumer (a stacked gather then sliced per leaf measured ~10% slower in the forward)
        size = plan.size(leaf)
        offsets = table_offset(lkeys, epoch, pair, table_span(table, size), size)  # (L,)
        for j, i in enumerate(idx):
            out[i] = (lowrank_at(table, offsets[j], leaf.shape, plan.rank) if leaf.kind == LOWRANK
                      else draw_at(table, offsets[j], size).reshape(leaf.shape))
    return out


def run_directions(plan: NoisePlan, key, table, epoch, first_pair, count: int) -> list:
    """Noise of the `count` consecutive directions first_pair, first_pair + 1, ... for every leaf
    (plan.leaves order, None for frozen), stacked on a leading axis: `member_directions` of each
    of those pairs, drawn together (one vectorised draw per bucket)."""
    pairs = first_pair + jnp.arange(count, dtype=jnp.int32)
    out: list = [None] * len(plan.leaves)
    for idx in leaf_buckets(plan):
        leaf = plan.leaves[idx[0]]
        z = _bucket_noise(plan, table, leaf_keys(key, [plan.leaves[i] for i in idx]), epoch, pairs, leaf)
        for j, i in enumerate(idx):
            out[i] = jax.tree_util.tree_map(lambda x, j=j: x[j], z)
    return out


# A chunk of the update reads about this many noise values or more (4 MiB of float32: cache-sized)
UPDATE_CACHE_ELEMENTS = 1 << 20


def update_chunk_size(n_dirs: int, leaves: int, size: int, shape: tuple, max_elements: int) -> int:
    """Directions per update chunk for a bucket of `leaves` same-shaped leaves (`size` noise values
    per direction, sums of `shape`): the largest divisor of n_dirs at most
    max(the accumulator's size / size, UPDATE_CACHE_ELEMENTS / (leaves size)), capped by
    max_elements / (leaves size). Each chunk then reads at least as much noise as it re-reads
    and re-writes of the running sums, and small leaves' chunks stay about cache-sized (measured
    on a 2-core CPU: width 256, N 4096, rank 1, 1.8x faster than 2^24-value chunks; width 4096,
    N 256 unchanged, one chunk)."""
    per = leaves * size
    want = max(-(-int(np.prod(shape)) // size), UPDATE_CACHE_ELEMENTS // per)
    return largest_divisor_at_most(n_dirs, max(1, min(want, max_elements // per)))


def direction_sums(plan: NoisePlan, key, table, epoch, weights, *, lowrank_sum, full_sum, acc_dtype,
                   max_elements: int, chunk: int | None = None) -> list:
    """sum_p weights[p] * noise_p per perturbed leaf (plan.leaves order; None for frozen), over
    the directions p = 0..len(weights)-1, with the forward's own noise.

    Per bucket of same-shaped leaves the directions are scanned in chunks (`update_chunk_size`, at
    most max_elements noise values per chunk, or `chunk` directions); lowrank_sum((a, b), w) with a (L, c, d0, r),
    b (L, c, d1, r) and full_sum(v, w) with v (L, c, size) return the chunk's (L, ...) sums in
    acc_dtype: one batched GEMM per bucket, no per-direction full-size matrix."""
    n_dirs = weights.shape[0]
    out: list = [None] * len(plan.leaves)
    for idx in leaf_buckets(plan):
        leaf = plan.leaves[idx[0]]
        lkeys = leaf_keys(key, [plan.leaves[i] for i in idx])  # (L, 2)
        c = chunk or update_chunk_size(n_dirs, len(idx), plan.size(leaf), leaf.shape, max_elements)
        if n_dirs % c:
            raise ValueError(f"update chunk {c} must divide the number of noise directions {n_dirs}")
        pairs = jnp.arange(n_dirs, dtype=jnp.int32).reshape(-1, c)
        ws = weights.reshape(-1, c)

        def body(acc, xs, leaf=leaf, lkeys=lkeys):
            p, w = xs
            z = _bucket_noise(plan, table, lkeys, epoch, p, leaf)
            if leaf.kind == LOWRANK:
                return acc + lowrank_sum(z, w), None
            return acc + full_sum(z.reshape(*z.shape[:2], -1), w).reshape(acc.shape), None

        acc0 = jnp.zeros((len(idx), *leaf.shape), acc_dtype)
        if pairs.shape[0] == 1:
            total, _ = body(acc0, (pairs[0], ws[0]))
        else:
            total, _ = lax.scan(body, acc0, (pairs, ws))
        for j, i in enumerate(idx):
            out[i] = total[j]
    return out


def _one_member_noise(plan: NoisePlan, key, table, generation, sigma, member):
    """Float noise handles for one member: the per-member reference path (one slice per leaf)."""
    pair, sign = member_coords(plan, member)
    return _handles(plan, member_directions(plan, key, table, epoch_of(plan, generation), pair), sign, sigma)


def _handles(plan: NoisePlan, zs, sign, sigma):
    """Per-leaf draws + antithetic sign(s) -> the float noise handles pytree."""
    out = []
    for leaf, z in zip(plan.leaves, zs):
        if leaf.kind == FROZEN:
            out.append(None)
        elif leaf.kind == LOWRANK:
            out.append(LowRank(*z, sign * sigma / math.sqrt(plan.rank)))
        else:
            out.append(Full(z, sign * sigma))
    return jax.tree_util.tree_unflatten(plan.treedef, out)


def _run_member_noise(plan: NoisePlan, key, table, generation, sigma, run: "MemberRun"):
    """`_one_member_noise` of every member of a run, stacked on axis 0, with each antithetic
    pair's threefry draw made once for its two members (half the random-number work). None
    (vmap the per-member path) for the table source, whose per-member slices measured faster on
    CPU than pair draws repeated for both members, or than contiguous reads of the run's slices."""
    if plan.source != "threefry":
        return None
    zs, members = run_pair_directions(plan, key, table, epoch_of(plan, generation), run)
    if zs is None:
        return None
    _, sign = member_coords(plan, members)
    return _handles(plan, zs, jnp.broadcast_to(sign, members.shape), sigma)


def run_pair_directions(plan: NoisePlan, key, table, epoch, run: "MemberRun"):
    """(per-leaf draws of each member of `run`, stacked on axis 0; the members' indices): each
    antithetic pair's draw is made once and repeated for its two members. (None, None) for an
    odd run with antithetic pairs."""
    members = run.start + jnp.arange(run.count, dtype=jnp.int32)
    if not plan.antithetic:
        return run_directions(plan, key, table, epoch, run.start, run.count), members
    if run.count % 2:
        return None, None
    zs = run_directions(plan, key, table, epoch, run.start // 2, run.count // 2)
    return jax.tree_util.tree_map(lambda z: jnp.repeat(z, 2, axis=0), zs), members


@functools.lru_cache(maxsize=None)
def _member_noise_fn(plan: NoisePlan):
    return over_member_runs(functools.partial(_one_member_noise, plan), functools.partial(_run_member_noise, plan))


def member_noise(plan: NoisePlan, key, table, generation, sigma, member):
    """Float noise handles (a pytree shaped like params) for one population member.

    Vmapped over one of `evaluate_population`'s chunks (a run of members), the run's noise is
    drawn at once where that is faster (`_run_member_noise`): the same values either way."""
    return _member_noise_fn(plan)(key, table, jnp.asarray(generation, jnp.int32),
                                  jnp.asarray(sigma, jnp.float32), jnp.asarray(member, jnp.int32))


# -- runs of consecutive members: the population-level path ----------------------------------------
class MemberRun(NamedTuple):
    """Members start, start + 1, ..., start + count - 1, with start a multiple of count (so a run
    of even length holds whole antithetic pairs): what `evaluate_population` declares about each
    chunk it vmaps over."""

    start: jax.Array
    count: int


_RUNS: list = []  # the member arrays declared runs while evaluate_population traces a chunk


@contextlib.contextmanager
def consecutive_members(members):
    """While tracing under this, `members` (1-D: start, start + 1, ...; start a multiple of its
    length) is a run: a function made by `over_member_runs` and vmapped over exactly this array
    computes the run at once. Only the code that built `members` can promise this."""
    _RUNS.append(members)
    try:
        yield
    finally:
        _RUNS.pop()


def member_run(members) -> MemberRun | None:
    """The declared run that `members` is (by identity, not value), or None."""
    if any(m is members for m in _RUNS):
        return MemberRun(members[0], int(members.shape[0]))
    return None


def over_member_runs(per_member: Callable, per_run: Callable) -> Callable:
    """per_member(*args, member) for one member, whose vmap over a declared run of members (and
    over nothing else) is per_run(*args, run): the same values (callers test it), computed for the
    whole run at once. Any other vmap, or per_run returning None, vmaps per_member."""
    f = jax.custom_batching.custom_vmap(per_member)

    @f.def_vmap
    def rule(axis_size, in_batched, *args):
        others = jax.tree_util.tree_leaves(in_batched[:-1])
        run = member_run(args[-1]) if in_batched[-1] is True and not any(others) else None
        out = None if run is None else per_run(*args[:-1], run)
        if out is None:
            axes = tuple(jax.tree_util.tree_map(lambda b: 0 if b else None, ib) for ib in in_batched)
            out = jax.vmap(per_member, in_axes=axes)(*args)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return f


def materialize(noise_tree):
    """Dense perturbations (zeros are not produced for frozen leaves: they stay None).
    Reference/testing helper: this builds every full-size matrix."""
    return jax.tree_util.tree_map(
        lambda n: n.materialize(), noise_tree, is_leaf=lambda n: isinstance(n, (LowRank, Full))
    )
