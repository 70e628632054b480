"""Integer EGGROLL: int8 low-rank noise, integer perturbed ops, and a z-tested ±1 update.

Everything that runs per generation is integer arithmetic; floats appear only when the noise
table is built (once) and in host-side helpers (the z value of a significance level).

Noise. One int8 table of round(16 N(0, 1)) values (clipped to ±127) is made from the key; a
member's factors are slices at offsets addressed exactly like the float strategy (noise.py:
path salts, leaf keys, `table_offset`, `direction_noise`), so one generation's directions of
a leaf read disjoint slices. Matrices get rank-r factors A (m, r), B (n, r); vectors get a
full int8 vector eps. Members come in antithetic pairs (member 2p: +, 2p+1: -).

Scaling. With weights stored as 16x their real value and noise entries 16x a standard normal,
the real perturbation sigma A_r B_r^T / sqrt(r) (sigma = 2^-sigma_shift) is, in weight units,
sign * A B^T / 2^shift with shift = 4 + sigma_shift + round(log2(r) / 2) (`lowrank_shift`).
A perturbed linear layer adds to its int32 accumulator

    pert = shift_round(sign * ((x B) A^T), shift)          (never builds A B^T)

which equals shift_round(x (sign A B^T)^T, shift) exactly (integer arithmetic is associative)
while |x B A^T| fits in int32: fan_in * (127 r * 16129 + 16129) < 2^31. For larger fan-in x rank
`pre_shift` rounds x B down by a few bits first (documented approximation, tested separately).
Vectors: v + shift_round(sign * eps, sigma_shift).

Update. Per antithetic pair p the fitness is f_p = sign(F+ - F-) ("sign") or the normalised
difference clip(round(4 (F+ - F-) / mean|F+ - F-|), -8, 8) ("norm"). Per parameter

    Z = sum_p f_p A_p B_p^T      (int32, accumulated over pair chunks; vectors: sum_p f_p eps_p)

Under the null hypothesis (fitness independent of the noise) Z has mean 0 and variance
S r v^2 for a matrix entry and S v for a vector entry (S = sum_p f_p^2, v = mean square of
the table entries). A parameter moves by sign(Z) (saturating at ±127) only where |Z| exceeds
z_{1-alpha/2} sqrt(S r) v (matrices) or z_{1-alpha/2} sqrt(S v) (vectors),
a two-sided z-test at level alpha; the threshold is computed in fixed point from an integer
z16 = round(16 z) (`z16_of_alpha`, on the host). |Z| > T >= 0, so Z = 0 never moves.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import int8 as i8
from . import noise as nz

FITNESS_MODES = ("sign", "norm")
STATISTICS = ("ab", "sign")  # Z from A B^T, or from sign(A) sign(B)^T
ALPHA_SCHEDULES = ("exp", "hyperbolic")
MOMENTUM_CAP = 1 << 30  # |M| saturates here (int32 headroom)
NORM_FITNESS_MAX = 8


class IntLowRank(NamedTuple):
    """Perturbation sign * a @ b.T / 2^shift (weight units) of an int8 matrix (m, n)."""

    a: jax.Array  # (m, r) int8
    b: jax.Array  # (n, r) int8
    sign: jax.Array  # int32 ±1
    shift: int

    def materialize(self) -> jax.Array:
        """sign * A B^T as int32 (m, n), *before* the shift (reference / tests only)."""
        return self.sign * i8.matmul(self.a, self.b)


class IntFull(NamedTuple):
    """Perturbation shift_round(sign * eps, shift) of an int8 vector."""

    eps: jax.Array  # int8, the parameter's shape
    sign: jax.Array
    shift: int


def lowrank_shift(sigma_shift: int, rank: int) -> int:
    return i8.FRAC_BITS + int(sigma_shift) + round(math.log2(rank) / 2)


def pre_shift(fan_in: int, rank: int) -> int:
    """Bits to drop from x B before multiplying by A^T so that the product fits int32 (0 when
    fan_in * (127 r + 1) * 16129 < 2^31: then the perturbation is exact)."""
    s = 0
    while (i8.QMAX ** 2 * fan_in >> s) * (i8.QMAX * rank) + i8.QMAX ** 2 * fan_in > i8.INT32_MAX:
        s += 1
    return s


def make_plan(params, rank: int, noise_reuse: int = 1, kinds=None) -> nz.NoisePlan:
    """noise.make_plan for int8 params (matrices low-rank, vectors full, or `kinds`)."""
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if jnp.result_type(x) != jnp.int8:
            raise TypeError(f"parameter {jax.tree_util.keystr(path)} has dtype {jnp.result_type(x)}; "
                            "integer EGGROLL needs int8 parameters (float models: eggroll.eggroll)")
    return nz.make_plan(params, rank=rank, antithetic=True, noise_reuse=noise_reuse, source="table", kinds=kinds)


def make_table(key, size: int) -> jax.Array:
    """int8 table of round(16 N(0, 1)) clipped to ±127 (built once; the only float use)."""
    z = jax.random.normal(jax.random.fold_in(jnp.asarray(key, jnp.uint32), 0x1B8), (int(size),))
    return jnp.clip(jnp.round(z * i8.SCALE), -i8.QMAX, i8.QMAX).astype(jnp.int8)


def table_variance(table) -> int:
    """Integer mean square of the table entries (host side; ~256)."""
    t = np.asarray(table, np.int64)
    return max(1, round(float(np.mean(t * t))))


def member_coords(member):
    """member -> (pair, int32 sign): +1 for even members, -1 for odd."""
    member = jnp.asarray(member, jnp.int32)
    return member // 2, 1 - 2 * (member % 2)


def member_noise(plan: nz.NoisePlan, key, table, generation, member, sigma_shift: int,
                 vector_sigma_shift: int | None = None):
    """Integer noise handles (pytree shaped like params) for one member. Vectors use
    vector_sigma_shift (default: sigma_shift)."""
    vshift = int(sigma_shift if vector_sigma_shift is None else vector_sigma_shift)
    epoch = nz.epoch_of(plan, jnp.asarray(generation, jnp.int32))
    pair, sign = member_coords(member)
    out = []
    for leaf in plan.leaves:
        if leaf.kind == nz.FROZEN:
            out.append(None)
            continue
        z = nz.direction_noise(plan, table, nz.leaf_key(key, leaf), epoch, pair, leaf)
        if leaf.kind == nz.LOWRANK:
            out.append(IntLowRank(z[0], z[1], sign, lowrank_shift(sigma_shift, plan.rank)))
        else:
            out.append(IntFull(z, sign, vshift))
    return jax.tree_util.tree_unflatten(plan.treedef, out)


# -- perturbed integer ops (one example; vmap adds the population) --------------------------------
def linear_acc(w, x, noise=None) -> jax.Array:
    """int32 accumulator of x (n,) int8 through w (m, n) int8, plus the member's perturbation."""
    acc = i8.matmul(x, w)
    if noise is None:
        return acc
    if not isinstance(noise, IntLowRank):
        raise TypeError(f"linear_acc: expected IntLowRank noise, got {type(noise).__name__}")
    n, r = noise.b.shape
    pre = pre_shift(n, r)
    xb = i8.shift_round(i8.matmul(x, noise.b.T), pre)  # (r,) int32
    p = lax.dot_general(xb, noise.a.astype(jnp.int32), (((xb.ndim - 1,), (1,)), ((), ())),
                        preferred_element_type=jnp.int32)  # (m,)
    return acc + i8.shift_round(noise.sign * p, noise.shift - pre)


def _rows(x, idx):
    """x[idx] for an integer index array of any shape, as (vmapped) dynamic slices: plain
    indexing of a mesh-replicated array inside shard_map trips jax's sharding check."""
    idx = jnp.asarray(idx)
    take = lambda i: lax.dynamic_index_in_dim(x, i, keepdims=False)  # noqa: E731
    for _ in range(idx.ndim):
        take = jax.vmap(take)
    return take(idx)


def embed(table, token, noise=None) -> jax.Array:
    """Row(s) `token` (any index shape) of an int8 table (vocab, d), perturbed rows
    sign * A[t] B^T / 2^shift."""
    row = _rows(table, token)
    if noise is None:
        return row
    p = i8.matmul(_rows(noise.a, token), noise.b)  # (..., d) int32, |.| <= 16129 r
    return i8.sat(row.astype(jnp.int32) + i8.shift_round(noise.sign * p, noise.shift))


def vector(v, noise=None) -> jax.Array:
    """An int8 vector parameter (bias, norm gain) plus its full-rank integer perturbation."""
    if noise is None:
        return v
    if not isinstance(noise, IntFull):
        raise TypeError(f"vector: expected IntFull noise, got {type(noise).__name__}")
    return i8.sat(v.astype(jnp.int32) + i8.shift_round(noise.sign * noise.eps.astype(jnp.int32), noise.shift))


# -- fitness and update --------------------------------------------------------------------------
def pair_fitness(fitness, mode: str = "sign") -> jax.Array:
    """Member fitnesses (N,) int32 (antithetic order) -> per-pair integer fitness (N/2,)."""
    if mode not in FITNESS_MODES:
        raise ValueError(f"fitness mode must be one of {FITNESS_MODES}, got {mode!r}")
    d = fitness[0::2].astype(jnp.int32) - fitness[1::2].astype(jnp.int32)
    if mode == "sign":
        return jnp.sign(d)
    scale = jnp.maximum((jnp.sum(jnp.abs(d)) + d.shape[0] // 2) // d.shape[0], 1)  # mean |d|
    q = (4 * d + scale // 2) // scale  # round(4 d / mean|d|), half up
    return jnp.clip(q, -NORM_FITNESS_MAX, NORM_FITNESS_MAX)


def isqrt(n) -> jax.Array:
    """floor(sqrt(n)) for int32 n in [0, 2^31), bit by bit in uint32 (no floats)."""
    n = jnp.asarray(n).astype(jnp.uint32)
    r = jnp.zeros_like(n)
    for bit in range(15, -1, -1):
        t = r | jnp.uint32(1 << bit)
        r = jnp.where(t * t <= n, t, r)
    return r.astype(jnp.int32)


def z16_of_alpha(alpha: float) -> int:
    """round(16 z) with z the two-sided normal quantile of level alpha (alpha = 1 -> 0). Host side."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return round(16 * NormalDist().inv_cdf(1 - alpha / 2)) if alpha < 1 else 0


def alpha_at(alpha: float, decay_bits: float, generation: int, generations: int,
             schedule: str = "exp") -> float:
    """Level schedule from alpha at g = 0 to alpha * 2^-decay_bits at g = G (constant when
    decay_bits = 0): "exp" alpha * 2^(-decay_bits g / G); "hyperbolic" alpha / (1 + (2^decay_bits
    - 1) g / G), which stays high for longer and lets fewer random moves through late."""
    if schedule not in ALPHA_SCHEDULES:
        raise ValueError(f"alpha schedule must be one of {ALPHA_SCHEDULES}, got {schedule!r}")
    frac = min(generation / max(generations, 1), 1.0)
    if schedule == "hyperbolic":
        return float(alpha) / (1.0 + (2.0 ** float(decay_bits) - 1.0) * frac)
    return float(alpha) * 2.0 ** (-float(decay_bits) * frac)


def momentum_scale16(bits: int) -> int:
    """round(16 sqrt(1 / (1 - beta^2))), beta = 1 - 2^-bits: the null standard deviation of the
    momentum M = beta M + Z relative to that of one generation's Z (bits = 0: no momentum, 16)."""
    if bits == 0:
        return 16
    beta = 1.0 - 2.0 ** -int(bits)
    return round(16 * math.sqrt(1.0 / (1.0 - beta * beta)))


def accumulate(momentum, stats, bits: int):
    """Integer momentum per parameter: M <- M - round(M / 2^bits) + Z, saturating at ±2^30
    (bits = 0: M = Z). stats / momentum: trees of int32 (None for frozen leaves)."""
    if bits == 0:
        return stats
    return jax.tree_util.tree_map(
        lambda m, z: jnp.clip(m - i8.shift_round(m, bits) + z, -MOMENTUM_CAP, MOMENTUM_CAP), momentum, stats)


def zero_momentum(params, plan: nz.NoisePlan):
    """Initial momentum: int32 zeros for perturbed leaves, None for frozen ones."""
    leaves = jax.tree_util.tree_leaves(params)
    return jax.tree_util.tree_unflatten(plan.treedef, [
        None if leaf.kind == nz.FROZEN else jnp.zeros(jnp.shape(x), jnp.int32) for leaf, x in zip(plan.leaves, leaves)])


def threshold(pair_f, rank: int, unit: int, z16) -> jax.Array:
    """Integer z-test threshold z sqrt(S r) unit, S = sum f_p^2; unit = the standard deviation
    of one noise term: v (mean square of the table) for an entry a b of a low-rank factor
    product, round(sqrt(v)) for an entry of a full noise vector."""
    s = jnp.sum(pair_f.astype(jnp.int32) ** 2)
    sq16 = isqrt(s * (rank << 8))  # 16 sqrt(S r), requires S r < 2^23
    t = (jnp.asarray(z16, jnp.int32) * sq16 + 8) >> 4  # 16 z sqrt(S r)
    return (t * unit + 8) >> 4  # z sqrt(S r) unit


def _largest_divisor_at_most(n: int, bound: int) -> int:
    for c in range(max(1, min(n, bound)), 0, -1):
        if n % c == 0:
            return c
    return 1


def update_statistic(plan: nz.NoisePlan, key, table, generation, pair_f, chunk: int | None = None,
                     stat: str = "ab"):
    """Z per parameter (int32, shaped like it; None for frozen): sum_p f_p A_p B_p^T or
    sum_p f_p eps_p, over pair chunks (lax.scan), with the forward's own noise function.
    stat "sign": sum_p f_p sign(A_p) sign(B_p)^T for matrices (each term ±f_p; vectors unchanged).
    Same-shaped leaves share one batched contraction."""
    if stat not in STATISTICS:
        raise ValueError(f"update statistic must be one of {STATISTICS}, got {stat!r}")
    epoch = nz.epoch_of(plan, jnp.asarray(generation, jnp.int32))
    n_pairs = pair_f.shape[0]
    buckets: dict[tuple, list[int]] = {}
    for i, leaf in enumerate(plan.leaves):
        if leaf.kind != nz.FROZEN:
            buckets.setdefault((leaf.kind, leaf.shape), []).append(i)
    out: list = [None] * len(plan.leaves)
    noise_all = jax.vmap(jax.vmap(nz.direction_noise, (None, None, None, None, 0, None)),
                         (None, None, 0, None, None, None))
    for (kind, shape), idx in buckets.items():
        leaves = [plan.leaves[i] for i in idx]
        lkeys = nz.leaf_keys(key, leaves)
        c = chunk or _largest_divisor_at_most(n_pairs, max(1, (1 << 22) // (len(idx) * plan.size(leaves[0]))))
        if n_pairs % c:
            raise ValueError(f"update chunk {c} must divide the number of pairs {n_pairs}")
        pairs = jnp.arange(n_pairs, dtype=jnp.int32).reshape(-1, c)
        fs = pair_f.astype(jnp.int32).reshape(-1, c)

        def body(acc, xs, kind=kind, shape=shape, lkeys=lkeys, leaf=leaves[0]):
            p, f = xs
            z = noise_all(plan, table, lkeys, epoch, p, leaf)
            if kind == nz.LOWRANK:
                a, b = z  # (L, c, m, r), (L, c, n, r) int8
                if stat == "sign":
                    a, b = jnp.sign(a), jnp.sign(b)
                af = a.astype(jnp.int32) * f[None, :, None, None]
                upd = jnp.einsum("lcir,lcjr->lij", af, b.astype(jnp.int32), preferred_element_type=jnp.int32)
            else:
                v = z.reshape(*z.shape[:2], -1).astype(jnp.int32)
                upd = jnp.einsum("c,lcn->ln", f, v, preferred_element_type=jnp.int32).reshape(lkeys.shape[0], *shape)
            return acc + upd, None

        acc0 = jnp.zeros((len(idx), *shape), jnp.int32)
        total, _ = lax.scan(body, acc0, (pairs, fs))
        for j, i in enumerate(idx):
            out[i] = total[j]
    return jax.tree_util.tree_unflatten(plan.treedef, out)


def apply_update(params, stats, thresholds):
    """params + sign(Z) where |Z| > threshold, saturating at ±127. stats: Z tree from
    `update_statistic` (None = frozen); thresholds: one int32 scalar per leaf (list, in
    tree_leaves order) or one scalar for all. Returns (new params, moved entries (int32), moved
    entries per leaf (list of int32, tree_leaves order))."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    zs = treedef.flatten_up_to(stats)
    if not isinstance(thresholds, (list, tuple)):
        thresholds = [thresholds] * len(leaves)
    new, moved = [], []
    for w, z, t in zip(leaves, zs, thresholds):
        if z is None:
            new.append(w)
            moved.append(jnp.int32(0))
            continue
        step = jnp.where(jnp.abs(z) > t, jnp.sign(z), 0)
        moved.append(jnp.sum(jnp.abs(step)))
        new.append(i8.sat(w.astype(jnp.int32) + step))
    return jax.tree_util.tree_unflatten(treedef, new), sum(moved[1:], moved[0]), moved


class IntUpdate(NamedTuple):
    params: object  # the new int8 params
    momentum: object  # int32 tree (the statistic itself when momentum_bits = 0)
    moved: jax.Array  # entries moved in total (int32)
    moved_leaves: list  # entries moved per leaf (tree_leaves order)
    pair_fitness: jax.Array  # (N / 2,) int32


def es_step(plan, key, table, generation, params, fitness, *, mode: str, z16, var: int,
            chunk: int | None = None, stat: str = "ab", momentum=None, momentum_bits: int = 0,
            vector_z16=None) -> IntUpdate:
    """Whole integer update from member fitnesses (N,) int32.

    Z per leaf (`update_statistic`), optionally folded into the momentum M (`accumulate`); a
    leaf entry moves by sign where |M| passes the z-test at z16 (matrices) / vector_z16 (vectors,
    default z16), whose null standard deviation is that of Z times momentum_scale16 / 16."""
    pf = pair_fitness(fitness, mode)
    stats = update_statistic(plan, key, table, generation, pf, chunk, stat)
    if momentum_bits:
        stats = accumulate(momentum, stats, momentum_bits)
    unit = 1 if stat == "sign" else var  # sd of one term of a matrix entry: 1 for ±1 products
    t_mat = threshold(pf, plan.rank, unit, z16)
    t_vec = threshold(pf, 1, round(math.sqrt(var)), z16 if vector_z16 is None else vector_z16)
    if momentum_bits:
        k16 = momentum_scale16(momentum_bits)
        t_mat, t_vec = (t_mat * k16 + 8) >> 4, (t_vec * k16 + 8) >> 4
    thr = [t_mat if leaf.kind == nz.LOWRANK else t_vec for leaf in plan.leaves]
    new, moved, per_leaf = apply_update(params, stats, thr)
    return IntUpdate(new, stats, moved, per_leaf, pf)
