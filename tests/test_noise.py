"""Noise addressing: antithetic signs, per-layer independence, reuse, determinism, kinds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eggroll
from eggroll import noise as nz

SMALL_TABLE = 1 << 16


def two_layer_params():
    # two same-shaped matrices: must still get independent noise
    return {"l1": {"w": jnp.zeros((16, 12))}, "l2": {"w": jnp.zeros((16, 12))}, "b": jnp.zeros(5)}


@pytest.mark.parametrize("source", ["table", "threefry"])
def test_antithetic_members_are_opposite(key, source):
    es = eggroll.eggroll(8, sigma=0.3, rank=2, noise_source=source, table_size=SMALL_TABLE)
    ctx = es.setup(key, two_layer_params())
    st = es.init(ctx)
    for k in range(4):
        plus = eggroll.materialize(es.noise(ctx, st, 2 * k))
        minus = eggroll.materialize(es.noise(ctx, st, 2 * k + 1))
        for p, m in zip(jax.tree_util.tree_leaves(plus), jax.tree_util.tree_leaves(minus)):
            np.testing.assert_array_equal(np.asarray(p), -np.asarray(m))
            assert np.abs(np.asarray(p)).sum() > 0
    # different pairs differ
    a = eggroll.materialize(es.noise(ctx, st, 0))["l1"]["w"]
    b = eggroll.materialize(es.noise(ctx, st, 2))["l1"]["w"]
    assert not np.allclose(a, b)


def test_without_antithetic_every_member_differs(key):
    es = eggroll.eggroll(5, sigma=0.3, antithetic=False, table_size=SMALL_TABLE)
    ctx = es.setup(key, two_layer_params())
    st = es.init(ctx)
    mats = [np.asarray(eggroll.materialize(es.noise(ctx, st, m))["l1"]["w"]) for m in range(5)]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not np.allclose(mats[i], mats[j])
            assert not np.allclose(mats[i], -mats[j])


@pytest.mark.parametrize("source", ["table", "threefry"])
def test_same_shaped_layers_get_uncorrelated_noise(key, source):
    es = eggroll.eggroll(512, sigma=1.0, rank=1, noise_source=source, table_size=1 << 20)
    ctx = es.setup(key, two_layer_params())
    st = es.init(ctx)
    members = jnp.arange(0, 512, 2)
    n = jax.vmap(lambda m: eggroll.materialize(es.noise(ctx, st, m)))(members)
    e1 = np.asarray(n["l1"]["w"]).reshape(len(members), -1)
    e2 = np.asarray(n["l2"]["w"]).reshape(len(members), -1)
    corr = np.corrcoef(e1.ravel(), e2.ravel())[0, 1]
    assert abs(corr) < 0.02, corr
    # per-member correlation between the two layers also small on average
    per = [np.corrcoef(a, b)[0, 1] for a, b in zip(e1, e2)]
    assert abs(np.mean(per)) < 0.03
    # unit variance of A B^T / sqrt(r) entries (sigma = 1)
    assert 0.9 < e1.var() < 1.1


def test_low_rank_is_really_low_rank(key):
    params = {"w": jnp.zeros((20, 30))}
    for r in (1, 2, 4):
        es = eggroll.eggroll(4, sigma=1.0, rank=r, table_size=SMALL_TABLE)
        ctx = es.setup(key, params)
        st = es.init(ctx)
        handle = es.noise(ctx, st, 1)["w"]
        assert handle.a.shape == (20, r) and handle.b.shape == (30, r)
        assert np.linalg.matrix_rank(np.asarray(handle.materialize())) == r
        np.testing.assert_allclose(handle.scale, -1.0 / np.sqrt(r), rtol=1e-6)


def test_noise_reuse(key):
    params = {"w": jnp.zeros((6, 5))}

    def noise_at(es, gen):
        ctx = es.setup(key, params)
        st = es.init(ctx)
        st = st._replace(generation=jnp.int32(gen))
        return np.asarray(eggroll.materialize(es.noise(ctx, st, 0))["w"])

    every = eggroll.eggroll(4, noise_reuse=1, table_size=SMALL_TABLE)
    assert not np.allclose(noise_at(every, 0), noise_at(every, 1))
    three = eggroll.eggroll(4, noise_reuse=3, table_size=SMALL_TABLE)
    np.testing.assert_array_equal(noise_at(three, 0), noise_at(three, 2))
    assert not np.allclose(noise_at(three, 2), noise_at(three, 3))
    np.testing.assert_array_equal(noise_at(three, 3), noise_at(three, 5))
    never = eggroll.eggroll(4, noise_reuse=0, table_size=SMALL_TABLE)
    np.testing.assert_array_equal(noise_at(never, 0), noise_at(never, 1000))


def test_dict_order_and_path_keys(key):
    """Noise depends on the parameter's path, not on its position among the leaves."""
    es = eggroll.eggroll(4, table_size=SMALL_TABLE)
    p1 = {"a": jnp.zeros((4, 3)), "z": jnp.zeros((4, 3))}
    p2 = {"z": jnp.zeros((4, 3)), "a": jnp.zeros((4, 3)), "extra": jnp.zeros((4, 3))}
    n1 = eggroll.materialize(es.noise(es.setup(key, p1), es.init(None), 3))
    n2 = eggroll.materialize(es.noise(es.setup(key, p2), es.init(None), 3))
    np.testing.assert_array_equal(n1["a"], n2["a"])
    np.testing.assert_array_equal(n1["z"], n2["z"])


def test_kinds_predicate_and_mask(key):
    params = {"emb": jnp.zeros((10, 4)), "w": jnp.zeros((4, 4)), "b": jnp.zeros(4), "conv": jnp.zeros((3, 3, 2))}
    es = eggroll.eggroll(4, table_size=SMALL_TABLE)
    n = es.noise(es.setup(key, params), es.init(None), 0)
    assert isinstance(n["emb"], eggroll.LowRank) and isinstance(n["w"], eggroll.LowRank)
    assert isinstance(n["b"], eggroll.Full) and isinstance(n["conv"], eggroll.Full)
    es2 = eggroll.eggroll(4, table_size=SMALL_TABLE, kinds=lambda path, x: "frozen" if "b" in path else ("lowrank" if x.ndim == 2 else "full"))
    n2 = es2.noise(es2.setup(key, params), es2.init(None), 0)
    assert n2["b"] is None and isinstance(n2["w"], eggroll.LowRank)
    mask = {"emb": "frozen", "w": "full", "b": "full", "conv": "frozen"}
    es3 = eggroll.eggroll(4, table_size=SMALL_TABLE, kinds=mask)
    n3 = es3.noise(es3.setup(key, params), es3.init(None), 0)
    assert n3["emb"] is None and isinstance(n3["w"], eggroll.Full)
    # open_es: everything full
    oe = eggroll.open_es(4, table_size=SMALL_TABLE)
    n4 = oe.noise(oe.setup(key, params), oe.init(None), 0)
    assert all(isinstance(v, eggroll.Full) for v in n4.values())


def test_table_slices_match_draw(key):
    """The table source returns a contiguous slice of the table: same function for all callers."""
    table = nz.make_table(key, SMALL_TABLE)
    v = nz.draw(table, key, jnp.int32(0), jnp.int32(7), 33)
    t = np.asarray(table)
    starts = [i for i in range(len(t) - 33) if t[i] == float(v[0])]
    assert any(np.array_equal(t[s : s + 33], np.asarray(v)) for s in starts)
    assert 0.9 < float(jnp.var(table)) < 1.1
