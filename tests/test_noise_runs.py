"""Runs of members (the population-level noise path): evaluate_population declares each chunk a
run, `over_member_runs` computes a declared run at once, and the noise it gives is bitwise the
per-member reference for every source, pairing, chunk and device count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eggroll
from conftest import jaxpr_eqns
from eggroll import noise as nz
from eggroll.models.mlp import init_mlp, mlp


def _probe():
    """A toy `over_member_runs` function that records, at trace time, the runs it was given."""
    seen = []

    def per_member(scale, member):
        return scale * member

    def per_run(scale, run):
        seen.append(run.count)
        return scale * (run.start + jnp.arange(run.count))

    return nz.over_member_runs(per_member, per_run), seen


@pytest.mark.parametrize("chunk", [None, 4])
def test_evaluate_population_declares_its_chunks(chunk):
    f, seen = _probe()
    out = jax.jit(lambda s: eggroll.evaluate_population(lambda m: f(s, m), 16, chunk=chunk, devices=jax.devices()[:1]))(
        jnp.float32(3.0))
    np.testing.assert_array_equal(np.asarray(out), 3.0 * np.arange(16))
    assert seen == [chunk or 16]


def test_sharded_chunks_are_runs_too():
    f, seen = _probe()
    out = jax.jit(lambda s: eggroll.evaluate_population(lambda m: f(s, m), 16, chunk=2))(jnp.float32(2.0))
    np.testing.assert_array_equal(np.asarray(out), 2.0 * np.arange(16))
    assert seen == [2]  # traced once inside shard_map; every device's chunks are runs


def test_other_vmaps_are_not_runs():
    """A vmap that evaluate_population did not build, or a function of the member index, or a
    batched non-member argument, takes the per-member path."""
    f, seen = _probe()
    ms = jnp.arange(8)
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda m: f(1.0, m))(ms)), np.arange(8))
    np.testing.assert_array_equal(
        np.asarray(eggroll.evaluate_population(lambda m: f(1.0, 2 * m), 8, devices=jax.devices()[:1])),
        2 * np.arange(8))
    out = eggroll.evaluate_population(lambda m: jax.vmap(lambda s: f(s, m))(jnp.ones(3)), 8,
                                      devices=jax.devices()[:1])
    np.testing.assert_array_equal(np.asarray(out), np.tile(np.arange(8)[:, None], 3))
    assert seen == []


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.mark.parametrize("source", ["threefry", "table"])
@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("chunk", [None, 2, 3])
def test_run_noise_is_the_per_member_noise(key, source, antithetic, chunk):
    """es.noise vmapped by evaluate_population == the per-member reference, bitwise (an odd chunk
    with antithetic pairs falls back to the per-member path)."""
    n = 12
    params = {"w": jnp.zeros((6, 5)), "v": jnp.zeros((6, 5)), "b": jnp.zeros(5)}
    es = eggroll.eggroll(n, 0.05, 2, antithetic=antithetic, noise_source=source)
    ctx = es.setup(key, params)
    state = es.init(ctx)._replace(generation=jnp.int32(3))
    got = jax.jit(lambda c, s: eggroll.evaluate_population(lambda m: es.noise(c, s, m), n, chunk=chunk,
                                                           devices=jax.devices()[:1]))(ctx, state)
    ref = jax.vmap(lambda m: nz._one_member_noise(ctx.plan, ctx.key, ctx.table, state.generation,
                                                  jnp.float32(0.05), m))(jnp.arange(n))
    assert _tree_equal(got, ref)


def _random_bits_shapes(closed_jaxpr) -> list:
    return [tuple(e.outvars[0].aval.shape) for e in jaxpr_eqns(closed_jaxpr) if e.primitive.name == "random_bits"]


def test_threefry_runs_draw_each_pair_once(key):
    """With antithetic pairs a run of threefry noise draws N/2 directions (6 + 5 normals each),
    where the per-member path draws N."""
    es = eggroll.eggroll(8, 0.05, 1, noise_source="threefry")
    ctx = es.setup(key, {"w": jnp.zeros((6, 5))})
    trace = lambda fn: _random_bits_shapes(jax.make_jaxpr(fn)(ctx, es.init(ctx)))  # noqa: E731
    run = trace(lambda c, s: eggroll.evaluate_population(lambda m: es.noise(c, s, m), 8, devices=jax.devices()[:1]))
    per_member = trace(lambda c, s: jax.vmap(lambda m: es.noise(c, s, m))(jnp.arange(8)))
    count = lambda shapes: sum(int(np.prod(s)) for s in shapes)  # noqa: E731
    assert run == [(1, 4, 11)] and count(per_member) == 8 * 11


@pytest.mark.parametrize("source", ["threefry", "table"])
def test_population_forward_on_four_devices_matches_per_member(key, source):
    n, width = 16, 8
    params = init_mlp(key, (width, width, 3))
    x = jax.random.normal(key, (n, width))
    es = eggroll.eggroll(n, 0.1, 1, noise_source=source)
    ctx = es.setup(key, params)
    state = es.init(ctx)
    got = jax.jit(lambda p, c, s: eggroll.evaluate_population(lambda m: mlp(p, x[m], es.noise(c, s, m)), n,
                                                              chunk=2))(params, ctx, state)
    ref = jax.jit(lambda p, c, s: jax.vmap(lambda m: mlp(p, x[m], nz._one_member_noise(
        c.plan, c.key, c.table, s.generation, jnp.float32(0.1), m)))(jnp.arange(n)))(params, ctx, state)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_default_chunk_is_cache_sized_and_results_do_not_depend_on_it(key):
    from eggroll.population import DEFAULT_CHUNK, default_chunk

    assert default_chunk(1024) is None and default_chunk(4096) == DEFAULT_CHUNK == 1024
    assert default_chunk(3000) == 1000 and default_chunk(2 * 1031) is None  # no divisor >= 256: one batch
    n, width = 2048, 32
    params = init_mlp(key, (width, width, width))
    x = jax.random.normal(key, (n, width))
    es = eggroll.eggroll(n, 0.1, 1)
    ctx = es.setup(key, params)
    fwd = jax.jit(lambda p, c, s, ch: eggroll.evaluate_population(lambda m: mlp(p, x[m], es.noise(c, s, m)), n,
                                                                  chunk=ch, devices=jax.devices()[:1]),
                  static_argnums=3)
    auto, whole, small = (np.asarray(fwd(params, ctx, es.init(ctx), ch)) for ch in (None, n, 256))
    np.testing.assert_array_equal(auto, whole)
    np.testing.assert_array_equal(small, whole)
