"""Integer EGGROLL: int8 low-rank noise and a z-tested ±1 update, behind the strategy interface.

    es = int8_eggroll(population=N, sigma=2**-4, rank=1, alpha=0.5)
    ctx = es.setup(key, params)                     # int8 noise table, plan, threshold schedule
    state = es.init(ctx)                            # generation counter (+ integer momentum)
    noise = es.noise(ctx, state, member)            # int8.IntLowRank / IntFull handles
    steps, state, metrics = es.tell(ctx, state, fitness)
    params = int8.apply_steps(params, steps)        # saturating +-1 moves

The perturbed integer ops (linear_acc, embed, vector) live in int8.py beside the other integer
arithmetic.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


from . import int8 as i8
from . import noise as nz
from .interface import ES

FITNESS_MODES = ("sign", "norm")
STATISTICS = ("ab", "sign")  # Z from A B^T, or from sign(A) sign(B)^T
ALPHA_SCHEDULES = ("exp", "hyperbolic")
MOMENTUM_CAP = 1 << 30  # |M| saturates here (int32 headroom)
NORM_FITNESS_MAX = 8


def lowrank_shift(sigma_shift: int, rank: int) -> int:
    return i8.FRAC_BITS + int(sigma_shift) + round(math.log2(rank) / 2)


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


def member_noise(plan: nz.NoisePlan, key, table, generation, member, sigma_shift: int,
                 vector_sigma_shift: int | None = None):
    """Integer noise handles (pytree shaped like params) for one member, from the one bucketed
    noise function (`noise.member_directions`). Vectors use vector_sigma_shift (default:
    sigma_shift)."""
    vshift = int(sigma_shift if vector_sigma_shift is None else vector_sigma_shift)
    pair, sign = nz.member_coords(plan, member, jnp.int32)
    zs = nz.member_directions(plan, key, table, nz.epoch_of(plan, jnp.asarray(generation, jnp.int32)), pair)
    out = []
    for leaf, z in zip(plan.leaves, zs):
        if leaf.kind == nz.FROZEN:
            out.append(None)
        elif leaf.kind == nz.LOWRANK:
            out.append(i8.IntLowRank(z[0], z[1], sign, lowrank_shift(sigma_shift, plan.rank)))
        else:
            out.append(i8.IntFull(z, sign, vshift))
    return jax.tree_util.tree_unflatten(plan.treedef, out)


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


def zero_momentum(plan: nz.NoisePlan):
    """Initial momentum: int32 zeros for perturbed leaves, None for frozen ones."""
    return jax.tree_util.tree_unflatten(plan.treedef, [
        None if leaf.kind == nz.FROZEN else jnp.zeros(leaf.shape, jnp.int32) for leaf in plan.leaves])


def threshold(pair_f, rank: int, unit: int, z16) -> jax.Array:
    """Integer z-test threshold z sqrt(S r) unit, S = sum f_p^2; unit = the standard deviation
    of one noise term: v (mean square of the table) for an entry a b of a low-rank factor
    product, round(sqrt(v)) for an entry of a full noise vector."""
    s = jnp.sum(pair_f.astype(jnp.int32) ** 2)
    sq16 = isqrt(s * (rank << 8))  # 16 sqrt(S r), requires S r < 2^23
    t = (jnp.asarray(z16, jnp.int32) * sq16 + 8) >> 4  # 16 z sqrt(S r)
    return (t * unit + 8) >> 4  # z sqrt(S r) unit


def update_statistic(plan: nz.NoisePlan, key, table, generation, pair_f, chunk: int | None = None,
                     stat: str = "ab"):
    """Z per parameter (int32, shaped like it; None for frozen): sum_p f_p A_p B_p^T or
    sum_p f_p eps_p, over pair chunks, with the forward's own noise (`noise.direction_sums`).
    stat "sign": sum_p f_p sign(A_p) sign(B_p)^T for matrices (each term ±f_p; vectors unchanged)."""
    if stat not in STATISTICS:
        raise ValueError(f"update statistic must be one of {STATISTICS}, got {stat!r}")

    def lowrank_sum(z, f):
        a, b = z  # (L, c, m, r), (L, c, n, r) int8
        if stat == "sign":
            a, b = jnp.sign(a), jnp.sign(b)
        af = a.astype(jnp.int32) * f[None, :, None, None]
        return nz.lowrank_contract(af, b.astype(jnp.int32), jnp.int32)

    def full_sum(v, f):  # (L, c, size) int8
        return jnp.einsum("c,lcn->ln", f, v.astype(jnp.int32), preferred_element_type=jnp.int32)

    zs = nz.direction_sums(plan, key, table, nz.epoch_of(plan, jnp.asarray(generation, jnp.int32)),
                           pair_f.astype(jnp.int32), lowrank_sum=lowrank_sum, full_sum=full_sum,
                           acc_dtype=jnp.int32, max_elements=1 << 22, chunk=chunk)
    return jax.tree_util.tree_unflatten(plan.treedef, zs)


def steps_of(stats, thresholds: list):
    """The ±1 moves sign(Z) where |Z| > threshold (int8; None for frozen leaves), and the moved
    entries per leaf (int32, plan.leaves order). thresholds: one int32 scalar per leaf."""
    moves, counts = [], []
    for z, t in zip(stats, thresholds):
        if z is None:
            moves.append(None)
            counts.append(jnp.int32(0))
            continue
        step = jnp.where(jnp.abs(z) > t, jnp.sign(z), 0)
        moves.append(step.astype(jnp.int8))
        counts.append(jnp.sum(jnp.abs(step)))
    return moves, counts


# -- the strategy ---------------------------------------------------------------------------------
class IntESState(NamedTuple):
    """What changes each generation: the counter and, with momentum_bits > 0, the int32 momentum."""

    generation: jax.Array
    momentum: Any = None


class IntSpec(NamedTuple):
    """The static settings of integer EGGROLL (hashable, so a jitted step can take the verbs
    as static arguments and share its compilation between equal strategies)."""

    population: int
    rank: int
    sigma_shift: int
    vector_sigma_shift: int
    fitness: str
    stat: str
    momentum_bits: int
    update_chunk: int | None


@dataclass(frozen=True)
class _Verb:
    """A spec-bound verb: equal (and hash-equal) for equal specs, weak-referenceable for jax.jit."""

    fn: Callable
    spec: IntSpec

    def __call__(self, *args):
        return self.fn(self.spec, *args)


def _noise(spec: IntSpec, ctx: nz.NoiseContext, state: IntESState, member):
    return member_noise(ctx.plan, ctx.key, ctx.table, state.generation, member, spec.sigma_shift,
                        spec.vector_sigma_shift)


def _tell(spec: IntSpec, ctx: nz.NoiseContext, state: IntESState, fitness):
    """fitness (N,) int32 -> (±1 steps tree, next state, integer metrics)."""
    if fitness.shape != (spec.population,):
        raise ValueError(f"fitness has shape {fitness.shape}; expected ({spec.population},)")
    plan, gen = ctx.plan, state.generation
    pf = pair_fitness(fitness, spec.fitness)
    stats = update_statistic(plan, ctx.key, ctx.table, gen, pf, spec.update_chunk, spec.stat)
    if spec.momentum_bits:
        stats = accumulate(state.momentum, stats, spec.momentum_bits)
    schedule = ctx.extra["z16"]  # (G + 1, 2): round(16 z) of the matrix / vector levels
    z16 = i8.rows(schedule, jnp.minimum(gen, schedule.shape[0] - 1))
    unit_mat, unit_vec = ctx.extra["units"][0], ctx.extra["units"][1]
    t_mat, t_vec = threshold(pf, plan.rank, unit_mat, z16[0]), threshold(pf, 1, unit_vec, z16[1])
    if spec.momentum_bits:  # the null sd of M is that of Z times sqrt(1 / (1 - beta^2))
        k16 = momentum_scale16(spec.momentum_bits)
        t_mat, t_vec = (t_mat * k16 + 8) >> 4, (t_vec * k16 + 8) >> 4
    thr = [t_mat if leaf.kind == nz.LOWRANK else t_vec for leaf in plan.leaves]
    moves, counts = steps_of(plan.treedef.flatten_up_to(stats), thr)
    metrics = {"moved": sum(counts[1:], counts[0]), "moved_leaves": jnp.stack(counts),
               "pairs_nonzero": jnp.sum(pf != 0), "z16": z16[0]}
    new = IntESState(gen + 1, stats if spec.momentum_bits else None)
    return jax.tree_util.tree_unflatten(plan.treedef, moves), new, metrics


def _shift_of(sigma: float, what: str) -> int:
    """sigma = 2^-k (k integer in [0, 12]) -> k."""
    k = -math.log2(sigma) if sigma > 0 else math.nan
    if not (math.isfinite(k) and k == round(k) and 0 <= k <= 12):
        raise ValueError(f"{what} must be a power of two 2^-k with k in 0..12 (integer arithmetic), got {sigma!r}")
    return int(round(k))


def _z16_schedule(alpha, vector_alpha, generations: int) -> np.ndarray:
    """(G + 1, 2) int32 round(16 z) of the levels at generations 0..G (host side, once)."""
    at = lambda a, g: float(a(g) if callable(a) else a)  # noqa: E731
    return np.asarray([[z16_of_alpha(at(alpha, g)), z16_of_alpha(at(vector_alpha, g))]
                       for g in range(generations + 1)], np.int32)


def int8_eggroll(population: int, sigma: float = 2.0 ** -4, rank: int = 1, *, vector_sigma: float | None = None,
                 alpha=1.0, vector_alpha=None, generations: int = 0, fitness: str = "sign", stat: str = "ab",
                 momentum_bits: int = 0, noise_reuse: int = 1, kinds=None, table_size: int | None = None,
                 update_chunk: int | None = None) -> ES:
    """Integer EGGROLL for int8 params (antithetic, noise from an int8 table).

    sigma / vector_sigma: powers of two (matrices / vectors; vectors default to sigma).
    alpha / vector_alpha: the z-test level, a float or a schedule generation -> level
    (evaluated on the host for generations 0..`generations` at setup; the last value holds
    after). fitness "sign" | "norm" (pair fitness), stat "ab" | "sign" (update statistic),
    momentum_bits k > 0: integer momentum with beta = 1 - 2^-k."""
    if not isinstance(population, int) or population < 2 or population % 2:
        raise ValueError(f"integer EGGROLL needs an even population >= 2 (antithetic pairs), got {population!r}")
    if fitness not in FITNESS_MODES or stat not in STATISTICS:
        raise ValueError(f"fitness must be one of {FITNESS_MODES} and stat one of {STATISTICS}, got {fitness!r}, {stat!r}")
    if not (isinstance(momentum_bits, int) and 0 <= momentum_bits <= 12):
        raise ValueError(f"momentum_bits must be an integer in [0, 12], got {momentum_bits!r}")
    shift = _shift_of(sigma, "sigma")
    vshift = shift if vector_sigma is None else _shift_of(vector_sigma, "vector_sigma")
    spec = IntSpec(population, rank, shift, vshift, fitness, stat, momentum_bits, update_chunk)
    vector_alpha = alpha if vector_alpha is None else vector_alpha
    z16 = _z16_schedule(alpha, vector_alpha, max(int(generations), 0))

    def setup(key, params) -> nz.NoiseContext:
        key = jax.random.key_data(key) if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key) else key
        plan = make_plan(params, rank, noise_reuse, kinds)
        table = make_table(key, nz.required_table_size(plan, table_size, population // 2))
        var = table_variance(table)
        units = jnp.asarray([1 if stat == "sign" else var, round(math.sqrt(var))], jnp.int32)
        return nz.NoiseContext(jnp.asarray(key, jnp.uint32), table, plan, {"z16": jnp.asarray(z16), "units": units})

    def init(ctx: nz.NoiseContext) -> IntESState:
        return IntESState(jnp.zeros((), jnp.int32), zero_momentum(ctx.plan) if momentum_bits else None)

    config = dict(strategy="int8_eggroll", population=population, rank=rank, sigma_shift=shift,
                  vector_sigma_shift=vshift, fitness=fitness, stat=stat, momentum_bits=momentum_bits,
                  noise_reuse=noise_reuse, table_size=table_size)
    return ES(setup, init, _Verb(_noise, spec), _Verb(_tell, spec), population, config)
