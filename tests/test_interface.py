"""Every registered strategy (float EGGROLL, OpenES, integer EGGROLL) behind one interface:
setup / init / noise / tell, checked against materialised references; the traced generation of
the low-rank strategies holds no per-member full-size matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jaxpr_shapes

import eggroll
from eggroll import int8 as i8
from eggroll import noise as nz

N = 16  # population: 8 antithetic pairs
SHAPES = {"a": (6, 5), "b": (6, 5), "c": (5, 6), "v": (6,)}  # a, b share a bucket
INTEGER = {"int8_eggroll"}
LOW_RANK = {"eggroll", "int8_eggroll"}


def _params(name):
    rng = np.random.default_rng(0)
    if name in INTEGER:
        return {k: jnp.asarray(rng.integers(-60, 60, s), jnp.int8) for k, s in SHAPES.items()}
    return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


def _strategy(name):
    if name in INTEGER:  # alpha 1: every nonzero statistic moves, so steps = sign(Z)
        return eggroll.make_strategy(name, N, 2.0 ** -2, 2, alpha=1.0, fitness="sign", table_size=1 << 12)
    return eggroll.make_strategy(name, N, 0.1, 2, shaping="raw", table_size=1 << 12)


def _fitness(name):
    rng = np.random.default_rng(1)
    if name in INTEGER:
        return jnp.asarray(rng.integers(-1000, 1000, N), jnp.int32)
    return jnp.asarray(rng.normal(size=N), jnp.float32)


def _dense(handle):
    """The member's perturbation as a dense array (int8: sign * A B^T before the shift)."""
    if isinstance(handle, i8.IntFull):
        return handle.sign * handle.eps.astype(jnp.int32)
    return handle.materialize()


def _members(es, ctx, state):
    is_handle = lambda n: isinstance(n, (nz.LowRank, nz.Full, i8.IntLowRank, i8.IntFull))  # noqa: E731
    return [jax.tree_util.tree_map(_dense, es.noise(ctx, state, m), is_leaf=is_handle) for m in range(N)]


@pytest.mark.parametrize("name", sorted(eggroll.STRATEGIES))
def test_every_strategy_answers_the_same_verbs(name):
    params, es = _params(name), _strategy(name)
    assert es.population == N and es.config["strategy"] == name
    ctx = es.setup(jax.random.PRNGKey(3), params)
    state = es.init(ctx)
    dense = _members(es, ctx, state)
    for p in range(N // 2):  # antithetic pairs: member 2p + 1 is the mirror of member 2p
        for x, y in zip(jax.tree_util.tree_leaves(dense[2 * p]), jax.tree_util.tree_leaves(dense[2 * p + 1])):
            np.testing.assert_array_equal(np.asarray(x), -np.asarray(y))
    f = _fitness(name)
    update, new_state, metrics = jax.jit(es.tell)(ctx, state, f)
    assert int(new_state.generation) == 1 and isinstance(metrics, dict)
    stacked = {k: np.stack([np.asarray(d[k], np.float64) for d in dense]) for k in SHAPES}
    if name in INTEGER:
        # Z = sum_p sign(f_2p - f_2p+1) (sign A B^T)_2p, and the step is sign(Z)
        pf = np.sign(np.asarray(f[0::2], np.int64) - np.asarray(f[1::2], np.int64))
        for k in SHAPES:
            z = np.tensordot(pf, stacked[k][0::2], 1)
            np.testing.assert_array_equal(np.asarray(update[k]), np.sign(z))
            assert update[k].dtype == jnp.int8
        moved = i8.apply_steps(params, update)
        np.testing.assert_array_equal(np.asarray(moved["a"], np.int32),
                                      np.clip(np.asarray(params["a"], np.int32) + np.sign(np.tensordot(
                                          pf, stacked["a"][0::2], 1)), -127, 127))
    else:
        # grad = -1 / (N sigma) sum_i f_i s_i E_i, with s_i sigma E_i the materialised handle
        for k in SHAPES:
            ref = -np.tensordot(np.asarray(f, np.float64), stacked[k], 1) / (N * 0.1 * 0.1)
            np.testing.assert_allclose(np.asarray(update[k]), ref, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(eggroll.STRATEGIES))
def test_traced_generation_holds_no_member_sized_matrix(name):
    """Population forward + tell: no (members, m, n) intermediate for the low-rank strategies;
    full-rank OpenES necessarily has one (its noise is the matrix), which shows the check bites."""
    params, es = _params(name), _strategy(name)
    ctx = es.setup(jax.random.PRNGKey(3), params)
    state = es.init(ctx)
    if name in INTEGER:
        x = jnp.ones((5,), jnp.int8)

        def member(m):
            n = es.noise(ctx, state, m)
            h = i8.linear_acc(params["a"], x, n["a"]) + i8.linear_acc(params["b"], x, n["b"])
            return jnp.sum(h) + jnp.sum(i8.linear_acc(params["c"], i8.vector(params["v"], n["v"]), n["c"]))
    else:
        x = jnp.ones((5,), jnp.float32)

        def member(m):
            n = es.noise(ctx, state, m)
            h = eggroll.linear(params["a"], x, n["a"]) + eggroll.linear(params["b"], x, n["b"])
            return jnp.sum(eggroll.linear(params["c"], h + eggroll.param(params["v"], n["v"]), n["c"]))

    def generation(state):
        f = eggroll.evaluate_population(member, N, chunk=4, devices=jax.local_devices()[:1])
        return es.tell(ctx, state, f)[0]

    shapes = jaxpr_shapes(jax.make_jaxpr(generation)(state))
    assert any(len(s) >= 2 for s in shapes)
    member_sized = [s for s in shapes if len(s) >= 3 and s[-2:] in ((6, 5), (5, 6)) and s[0] in (N, N // 2, 4)]
    if name in LOW_RANK:
        assert not member_sized, member_sized
    else:
        assert member_sized


def test_make_strategy_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="unknown strategy 'cma'"):
        eggroll.make_strategy("cma", 8, 0.1)
    with pytest.raises(ValueError, match="power of two"):
        eggroll.make_strategy("int8_eggroll", 8, 0.3)
