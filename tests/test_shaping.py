"""Fitness shaping functions against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

import eggroll
from eggroll.shaping import get_shaping


def test_centered_rank_values_and_ties():
    w = eggroll.centered_rank(jnp.array([3.0, 1.0, 2.0, 10.0]))
    np.testing.assert_allclose(w, [1 / 6, -0.5, -1 / 6, 0.5], rtol=1e-6)
    tied = eggroll.centered_rank(jnp.array([5.0, 5.0, 1.0, 9.0]))
    assert tied[0] == tied[1]  # equal fitness -> equal weight
    np.testing.assert_allclose(tied, [0.0, 0.0, -0.5, 0.5], atol=1e-6)


def test_centered_rank_nonfinite():
    w = eggroll.centered_rank(jnp.array([jnp.nan, 1.0, 2.0, -jnp.inf, 3.0]))
    np.testing.assert_allclose(w, [0.0, -0.5, 0.0, 0.0, 0.5], atol=1e-6)


def test_z_score():
    f = jnp.array([1.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(eggroll.z_score(f), (f - 3.0) / np.std([1, 2, 3, 6]), rtol=1e-6)
    np.testing.assert_array_equal(eggroll.z_score(jnp.ones(4)), jnp.zeros(4))
    w = eggroll.z_score(jnp.array([1.0, jnp.nan, 3.0]))
    np.testing.assert_allclose(w, [-1.0, 0.0, 1.0], rtol=1e-6)


def test_group_z_score_uses_global_std():
    # 3 members x 2 prompts; column means (2, 10); centred entries; ONE global std
    f = jnp.array([[1.0, 10.0], [2.0, 12.0], [3.0, 8.0]])
    c = np.array([[-1.0, 0.0], [0.0, 2.0], [1.0, -2.0]])
    std = np.sqrt((c**2).mean())
    np.testing.assert_allclose(eggroll.group_z_score(f), (c / std).mean(1), rtol=1e-6)
    # per-group std would give a different answer: make sure we did not compute that
    per_group = (c / c.std(0)).mean(1)
    assert not np.allclose(eggroll.group_z_score(f), per_group)
    with pytest.raises(ValueError, match="members, groups"):
        eggroll.group_z_score(jnp.ones(4))


def test_antithetic_sign_and_diff():
    f = jnp.array([3.0, 1.0, 0.0, 2.0, 5.0, 5.0])
    np.testing.assert_array_equal(eggroll.antithetic_sign(f), [0.5, -0.5, -0.5, 0.5, 0.0, -0.0])
    d = np.array([2.0, -2.0, 0.0])
    np.testing.assert_allclose(eggroll.antithetic_diff(f), np.stack([d, -d], 1).ravel() / (2 * d.std()), rtol=1e-6)
    w = eggroll.antithetic_sign(jnp.array([jnp.nan, 1.0, 2.0, 1.0]))
    np.testing.assert_array_equal(w, [0.0, 0.0, 0.5, -0.5])
    with pytest.raises(ValueError, match="even population"):
        eggroll.antithetic_sign(jnp.ones(3))


def test_registry():
    assert get_shaping("centered_rank") is eggroll.centered_rank
    custom = lambda f: f  # noqa: E731
    assert get_shaping(custom) is custom
    with pytest.raises(ValueError, match="unknown shaping"):
        get_shaping("rank")
