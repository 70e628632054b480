"""Integer arithmetic for integer-only models (EGG): saturation, rounding shifts, int8 matmul
with int32 accumulation, a float-free norm, and fixed-point exp2 / log2 tables for an integer
log-softmax.

Fixed point. An activation or weight stored as the int8 q means the real value q / 16
(4 fractional bits, SCALE = 16); int8 values are kept in the symmetric range [-127, 127] so that
negation never overflows. Products of two such values carry 8 fractional bits and are summed in
int32; a power-of-two right shift (with round-half-up) brings a sum back to 4 fractional bits and
`sat` clips it to int8. Nothing here uses a floating-point type, except the builders of the
constant tables (run once, in NumPy, at import) and the float reference helpers used by tests.

Overflow. |int8 * int8| <= 127^2 = 16129, so an int32 dot product of fan-in n is exact for
n <= MAX_FAN_IN = 2^16 (16129 * 2^16 < 2^31 - 1).

Log-likelihood. Logits are int8 in units of 1/16 bit: p_i = 2^(l_i/16) / sum_j 2^(l_j/16).
`log2_prob16` returns log2 p_t in units of 1/16 bit (an int32 <= 0), computed as

    (l_t - max l) - 16 * log2( sum_j EXP2[l_j - max l] / 2^16 )

with EXP2[d] = round(2^16 * 2^(d/16)) for d in [-254, 0] and log2 of the (<= 2^24) sum from its
leading-bit position plus a 2^LOG2_MANT_BITS-entry table of 16 * 256 * log2(1 + m / 2^bits). The
quantisation error is documented and tested in `LOG2_PROB16_MAX_ERROR` (in 1/16-bit units).

Perturbed ops (one example; vmap adds the population). A member's integer noise handle is
IntLowRank (matrix: perturbation sign * A B^T / 2^shift in weight units, A (m, r), B (n, r)
int8) or IntFull (vector: shift_round(sign * eps, shift)); integer EGGROLL (int8_strategy)
makes them. `linear_acc` adds shift_round(sign * ((x B) A^T), shift) to the int32 accumulator
of x W^T -- never building A B^T -- which equals shift_round(x (sign A B^T)^T, shift) exactly
while |x B A^T| fits int32; beyond that fan-in x rank `pre_shift` rounds x B down first
(documented approximation, tested). With noise=None every op is the plain integer model.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import logsumexp

SCALE = 16  # int8 value q represents q / SCALE
FRAC_BITS = 4
QMAX = 127  # symmetric int8 range [-QMAX, QMAX]
MAX_FAN_IN = 1 << 16  # QMAX^2 * MAX_FAN_IN < 2^31: int32 dot products cannot overflow
INT32_MAX = (1 << 31) - 1

# -- exp2 / log2 tables ------------------------------------------------------------------------
EXP2_BITS = 16  # EXP2[d] = round(2^16 * 2^(d / 16))
EXP2_MIN = -2 * QMAX  # logits differ by at most 254
# index i <-> d = i + EXP2_MIN; int32, all >= 1 so no token has probability exactly 0
EXP2_TABLE = np.maximum(
    np.round(2.0 ** (EXP2_BITS + np.arange(EXP2_MIN, 1) / SCALE)), 1).astype(np.int32)
LOG2_MANT_BITS = 8
LOG2_FRAC = 256  # LOG2_TABLE is in units of 1/(16 * 256) bit (so 1/16-bit rounding happens once)
LOG2_TABLE = np.round(
    SCALE * LOG2_FRAC * np.log2(1.0 + np.arange(1 << LOG2_MANT_BITS) / (1 << LOG2_MANT_BITS))
).astype(np.int32)
# |integer log2 p - exact log2 p| in 1/16-bit units, bounded by: EXP2 rounding (relative error
# <= 0.5 / 2^16 per dominant term, ~0 bits), mantissa truncation (< log2(1 + 2^-8) = 0.0056 bit
# = 0.09 units), table rounding (1/(2*256) unit) and the final rounding to 1/16 bit (0.5 units).
# Tiny EXP2 entries (d near -254, value ~1) are relatively coarse but sum to < 2^-15 of the total.
LOG2_PROB16_MAX_ERROR = 0.75

# -- norm division table -------------------------------------------------------------------------
DIV_BITS = 16  # DIV_TABLE[m] = round(2^16 / m), m = integer mean |x| in [1, 127] (0 -> 1)
DIV_TABLE = np.round((1 << DIV_BITS) / np.maximum(np.arange(QMAX + 1), 1)).astype(np.int32)


def sat(x) -> jnp.ndarray:
    """Saturate an integer array to [-127, 127] and return int8."""
    return jnp.clip(x, -QMAX, QMAX).astype(jnp.int8)


def shift_round(x, s: int) -> jnp.ndarray:
    """x / 2^s rounded half up (floor(x / 2^s + 1/2)), as an int32 arithmetic shift; s >= 0 static."""
    x = jnp.asarray(x, jnp.int32)
    if s < 0:
        raise ValueError(f"shift must be >= 0, got {s}")
    if s == 0:
        return x
    return (x + (1 << (s - 1))) >> s


def matmul(x, w) -> jnp.ndarray:
    """x (..., n) int8 @ w (m, n).T int8 -> (..., m) int32 (exact for n <= MAX_FAN_IN)."""
    n = x.shape[-1]
    if n > MAX_FAN_IN:
        raise ValueError(f"fan-in {n} exceeds MAX_FAN_IN {MAX_FAN_IN}: the int32 accumulator could overflow")
    return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def matmul_shift(fan_in: int) -> int:
    """Shift that rescales an int8 x int8 dot product of `fan_in` terms to int8 fixed point:
    round(log2(16 * sqrt(fan_in))). With weights ~16 N(0, 1) this keeps unit-variance inputs
    at unit variance (the 1/sqrt(fan_in) of standard initialisation, applied after the sum)."""
    return round(math.log2(SCALE * math.sqrt(fan_in)))


def abs_mean(x) -> jnp.ndarray:
    """Integer mean of |x| over the last axis, rounded half up: int32 in [0, 127]."""
    n = x.shape[-1]
    s = jnp.sum(jnp.abs(x.astype(jnp.int32)), axis=-1)
    return (s + n // 2) // n


def norm(x, w) -> jnp.ndarray:
    """Float-free norm: y = sat(x * w / mean|x|), the division through DIV_TABLE.

    x (..., d) int8, w (d,) int8 (16 = gain 1). Real meaning: y/16 = (x/16) / (mean|x|/16) * (w/16)
    so the output has mean |y| = 16 (real 1) when w = 16. No centring. |x*w*DIV| <= 16129 * 2^16
    < 2^31, so the int32 product cannot overflow."""
    m = abs_mean(x)
    div = jnp.asarray(DIV_TABLE)[m][..., None]  # (..., 1)
    prod = x.astype(jnp.int32) * w.astype(jnp.int32)  # |.| <= 16129
    return sat(shift_round(prod * div, DIV_BITS))


def log2_fixed(s) -> jnp.ndarray:
    """16 * 256 * log2(s) for int32 s >= 1, rounded down to the mantissa table (exact at powers of 2)."""
    s = jnp.asarray(s, jnp.int32)
    k = 31 - lax.clz(s)  # index of the leading 1 bit
    # LOG2_MANT_BITS bits after the leading one (shift right or left to line them up)
    right = jnp.maximum(k - LOG2_MANT_BITS, 0)
    left = jnp.maximum(LOG2_MANT_BITS - k, 0)
    mant = ((s >> right) << left) & ((1 << LOG2_MANT_BITS) - 1)
    return k * (SCALE * LOG2_FRAC) + jnp.asarray(LOG2_TABLE)[mant]


def log2_prob16(logits, target) -> jnp.ndarray:
    """log2 softmax_2(logits / 16)[target] in 1/16-bit units, int32 (<= 0). logits (256,) int8,
    target an integer index. Batch with vmap."""
    d = logits.astype(jnp.int32) - jnp.max(logits).astype(jnp.int32)  # in [-254, 0]; max taken on int8 (faster)
    total = jnp.sum(jnp.asarray(EXP2_TABLE)[d - EXP2_MIN])  # <= 256 * 2^16 = 2^24
    # log2(total / 2^16) in 1/16 bit, rounded: (log2_fixed(total) - 16*256*16 + 128) >> 8
    lse = (log2_fixed(total) - SCALE * LOG2_FRAC * EXP2_BITS + LOG2_FRAC // 2) >> 8
    return d[target] - lse


# -- float references (tests, metrics) -------------------------------------------------------------
def log2_prob_reference(logits, target) -> np.ndarray:
    """Exact log2 p[target] (bits) of the distribution p_i ∝ 2^(l_i / 16), in float64 NumPy."""
    l = np.asarray(logits, np.float64) / SCALE
    m = l.max(-1, keepdims=True)
    lse = m[..., 0] + np.log2(np.sum(2.0 ** (l - m), axis=-1))
    return np.take_along_axis(l, np.asarray(target)[..., None], -1)[..., 0] - lse


def log2_prob_float(logits, target) -> jnp.ndarray:
    """The same exact log2 p[target] in float32 jax (for evaluation metrics, not training)."""
    l = logits.astype(jnp.float32) * (math.log(2.0) / SCALE)  # natural-log logits
    lp = l - logsumexp(l, axis=-1, keepdims=True)
    return jnp.take_along_axis(lp, jnp.asarray(target)[..., None], -1)[..., 0] / math.log(2.0)


# -- perturbed integer ops ------------------------------------------------------------------------
class IntLowRank(NamedTuple):
    """Perturbation sign * a @ b.T / 2^shift (weight units) of an int8 matrix (m, n)."""

    a: jax.Array  # (m, r) int8
    b: jax.Array  # (n, r) int8
    sign: jax.Array  # int32 +-1
    shift: int

    def materialize(self) -> jax.Array:
        """sign * A B^T as int32 (m, n), *before* the shift (reference / tests only)."""
        return self.sign * matmul(self.a, self.b)


class IntFull(NamedTuple):
    """Perturbation shift_round(sign * eps, shift) of an int8 vector."""

    eps: jax.Array  # int8, the parameter's shape
    sign: jax.Array
    shift: int


def pre_shift(fan_in: int, rank: int) -> int:
    """Bits to drop from x B before multiplying by A^T so that the product fits int32 (0 when
    fan_in * (127 r + 1) * 16129 < 2^31: then the perturbation is exact)."""
    s = 0
    while (QMAX ** 2 * fan_in >> s) * (QMAX * rank) + QMAX ** 2 * fan_in > INT32_MAX:
        s += 1
    return s


def linear_acc(w, x, noise=None) -> jax.Array:
    """int32 accumulator of x (n,) int8 through w (m, n) int8, plus the member's perturbation."""
    acc = matmul(x, w)
    if noise is None:
        return acc
    if not isinstance(noise, IntLowRank):
        raise TypeError(f"linear_acc: expected IntLowRank noise, got {type(noise).__name__}")
    n, r = noise.b.shape
    pre = pre_shift(n, r)
    xb = shift_round(matmul(x, noise.b.T), pre)  # (r,) int32
    p = lax.dot_general(xb, noise.a.astype(jnp.int32), (((xb.ndim - 1,), (1,)), ((), ())),
                        preferred_element_type=jnp.int32)  # (m,)
    return acc + shift_round(noise.sign * p, noise.shift - pre)


def rows(x, idx):
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
    row = rows(table, token)
    if noise is None:
        return row
    p = matmul(rows(noise.a, token), noise.b)  # (..., d) int32, |.| <= 16129 r
    return sat(row.astype(jnp.int32) + shift_round(noise.sign * p, noise.shift))


def vector(v, noise=None) -> jax.Array:
    """An int8 vector parameter (bias, norm gain) plus its full-rank integer perturbation."""
    if noise is None:
        return v
    if not isinstance(noise, IntFull):
        raise TypeError(f"vector: expected IntFull noise, got {type(noise).__name__}")
    return sat(v.astype(jnp.int32) + shift_round(noise.sign * noise.eps.astype(jnp.int32), noise.shift))


def apply_steps(params, steps):
    """params + steps (a tree of int8 +-1 / 0 from integer EGGROLL's tell; None = frozen leaf),
    saturating at +-127."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    moves = treedef.flatten_up_to(steps)
    return jax.tree_util.tree_unflatten(treedef, [
        w if d is None else sat(w.astype(jnp.int32) + d.astype(jnp.int32)) for w, d in zip(leaves, moves)])
