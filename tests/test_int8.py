"""int8 arithmetic against float / brute-force references: saturation, rounding shifts, int8
matmul (no int32 overflow at the maximum fan-in), the norm, and the exp2/log2 log-softmax."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eggroll import int8 as i8

RNG = np.random.default_rng(0)


def test_sat_clips_to_symmetric_int8():
    x = jnp.asarray([-100000, -128, -127, -1, 0, 5, 127, 128, 99999], jnp.int32)
    y = i8.sat(x)
    assert y.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(y), np.clip(np.asarray(x), -127, 127))


@pytest.mark.parametrize("s", [0, 1, 4, 8, 13])
def test_shift_round_is_round_half_up(s):
    x = RNG.integers(-2**24, 2**24, 5000)
    got = np.asarray(i8.shift_round(jnp.asarray(x, jnp.int32), s))
    np.testing.assert_array_equal(got, np.floor(x / 2.0 ** s + 0.5).astype(np.int64))


def test_shift_round_rejects_negative_shift():
    with pytest.raises(ValueError, match="shift"):
        i8.shift_round(jnp.int32(3), -1)


def test_matmul_is_exact_int32():
    x = RNG.integers(-127, 128, (7, 33)).astype(np.int8)
    w = RNG.integers(-127, 128, (5, 33)).astype(np.int8)
    y = i8.matmul(jnp.asarray(x), jnp.asarray(w))
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(y), x.astype(np.int64) @ w.astype(np.int64).T)


def test_matmul_no_overflow_at_max_fan_in():
    n = i8.MAX_FAN_IN
    x = jnp.full((n,), -127, jnp.int8)
    w = jnp.stack([jnp.full((n,), -127, jnp.int8), jnp.full((n,), 127, jnp.int8)])
    y = np.asarray(i8.matmul(x, w))
    np.testing.assert_array_equal(y, [127 * 127 * n, -127 * 127 * n])
    assert 127 * 127 * n <= i8.INT32_MAX
    with pytest.raises(ValueError, match="fan-in"):
        i8.matmul(jnp.zeros((n + 1,), jnp.int8), jnp.zeros((1, n + 1), jnp.int8))


def test_matmul_shift_keeps_unit_variance():
    # a dot of unit-variance inputs with 16 N(0,1) weights, shifted, has std ~16 (real 1)
    n = 256
    x = np.clip(np.round(RNG.normal(size=(4000, n)) * 16), -127, 127).astype(np.int8)
    w = np.clip(np.round(RNG.normal(size=(64, n)) * 16), -127, 127).astype(np.int8)
    y = i8.shift_round(i8.matmul(jnp.asarray(x), jnp.asarray(w)), i8.matmul_shift(n))
    assert 12 < float(np.std(np.asarray(y))) < 21
    assert i8.matmul_shift(256) == 8 and i8.matmul_shift(1024) == 9


def test_norm_matches_float_reference():
    d = 64
    x = RNG.integers(-127, 128, (500, d)).astype(np.int8)
    x[:100] //= 8  # smaller activations too (mean |x| ~ 8)
    w = RNG.integers(-40, 41, d).astype(np.int8)
    got = np.asarray(i8.norm(jnp.asarray(x), jnp.asarray(w))).astype(np.float64)
    m = np.abs(x.astype(np.float64)).mean(-1, keepdims=True)
    ref = np.clip(x * w.astype(np.float64) / m, -127, 127)
    # documented error: the mean is rounded to an integer (relative error <= 0.5 / m), the
    # table entry to 1 / 2^16, and the result to 1 (then both sides saturate)
    bound = np.abs(x * w.astype(np.float64)) / m * (0.5 / (m - 0.5)) + 1.0
    assert np.all(np.abs(got - ref) <= bound + 1e-9)
    # output scale: mean |y| ~ 16 * mean|w| / 16 when not saturated
    g16 = np.asarray(i8.norm(jnp.asarray(x), jnp.full((d,), 16, jnp.int8))).astype(np.float64)
    assert abs(np.abs(g16).mean() - 16) < 1.5


def test_norm_of_zero_is_zero():
    y = i8.norm(jnp.zeros((8,), jnp.int8), jnp.full((8,), 16, jnp.int8))
    np.testing.assert_array_equal(np.asarray(y), 0)


def test_log2_fixed_matches_log2():
    s = np.concatenate([2 ** np.arange(25), RNG.integers(1, 2**24, 5000)])
    got = np.asarray(i8.log2_fixed(jnp.asarray(s, jnp.int32))) / (16 * 256)
    err = np.log2(s) - got
    assert np.all(err >= -1 / (2 * 16 * 256) - 1e-12)  # truncated mantissa: never above
    assert np.all(err <= math.log2(1 + 2 ** -8) + 1 / (2 * 16 * 256))
    np.testing.assert_array_equal(got[:25], np.arange(25))  # exact at powers of two


@pytest.mark.parametrize("scale", [4.0, 30.0, 200.0])
def test_log2_prob16_within_documented_error(scale):
    logits = np.clip(np.round(RNG.normal(size=(2000, 256)) * scale), -127, 127).astype(np.int8)
    target = RNG.integers(0, 256, 2000)
    got = np.asarray(jax.vmap(i8.log2_prob16)(jnp.asarray(logits), jnp.asarray(target)))
    assert got.dtype == np.int32 and np.all(got <= 0)
    ref = i8.log2_prob_reference(logits, target) * 16
    assert np.abs(got - ref).max() <= i8.LOG2_PROB16_MAX_ERROR


def test_log2_prob16_extremes():
    logits = np.full(256, -127, np.int8)
    logits[3] = 127
    lp = int(i8.log2_prob16(jnp.asarray(logits), 3))
    ref = i8.log2_prob_reference(logits[None], np.array([3]))[0] * 16
    assert abs(lp - ref) <= i8.LOG2_PROB16_MAX_ERROR
    lp_low = int(i8.log2_prob16(jnp.asarray(logits), 4))
    ref_low = i8.log2_prob_reference(logits[None], np.array([4]))[0] * 16
    assert abs(lp_low - ref_low) <= i8.LOG2_PROB16_MAX_ERROR
    uniform = int(i8.log2_prob16(jnp.zeros(256, jnp.int8), 0))
    assert uniform == -8 * 16  # log2(1/256) = -8 bits exactly


def test_float_log2_prob_matches_reference():
    logits = RNG.integers(-127, 128, (50, 256)).astype(np.int8)
    t = RNG.integers(0, 256, 50)
    got = np.asarray(i8.log2_prob_float(jnp.asarray(logits), jnp.asarray(t)))
    np.testing.assert_allclose(got, i8.log2_prob_reference(logits, t), atol=1e-4)
