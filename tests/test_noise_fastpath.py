"""The vectorised noise path (all leaves' offsets at once, factors sliced straight from the table)
gives exactly the values of the reference `noise.draw`, in the forward and in the update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eggroll
from eggroll import noise as nz


def params():
    return {"a": jnp.zeros((5, 7)), "b": jnp.zeros(4), "c": {"w": jnp.zeros((7, 5)), "v": jnp.zeros((7, 5))}}


def test_threefry_offset_helpers_agree():
    rng = np.random.default_rng(0)
    lk = jnp.asarray(rng.integers(0, 2**32, (6, 1, 2), dtype=np.uint64).astype(np.uint32))
    span = jnp.asarray(rng.integers(1, 2**31, (6, 1)), jnp.int32)
    pair = jnp.arange(11)[None, :]
    off = nz.table_offset(lk, jnp.int32(3), pair, span)  # rolled loop
    h0, _ = nz.threefry2x32(lk[..., 0], lk[..., 1], 3, pair)  # unrolled reference
    np.testing.assert_array_equal(off, nz._mulhi_u32(h0, span.astype(jnp.uint32)).astype(jnp.int32))
    assert off.shape == (6, 11) and bool((off >= 0).all() & (off < span).all())
    # exact floor(a * b / 2**32)
    a = rng.integers(0, 2**32, 5000, dtype=np.uint64)
    b = rng.integers(1, 2**31, 5000, dtype=np.uint64)
    got = nz._mulhi_u32(jnp.asarray(a.astype(np.uint32)), jnp.asarray(b.astype(np.uint32)))
    np.testing.assert_array_equal(np.asarray(got, np.uint64), (a * b) >> np.uint64(32))


def test_offsets_are_roughly_uniform():
    lk = nz.leaf_keys(jnp.asarray([1, 2], jnp.uint32), nz.make_plan(params(), rank=1, antithetic=True,
                                                                      noise_reuse=1, source="table").leaves[:1])
    counts = np.bincount(np.asarray(nz.table_offset(lk, 0, jnp.arange(100_000), 100)).ravel(), minlength=100)
    assert counts.min() > 800 and counts.max() < 1200  # expected 1000 each


@pytest.mark.parametrize("rank", [1, 3])
def test_member_noise_equals_reference_draw(key, rank):
    es = eggroll.eggroll(8, rank=rank, table_size=1 << 12, noise_reuse=2)
    st = es.init(key, params())
    plan = st.plan
    assert [tuple(k) for k in np.asarray(nz.leaf_keys(st.key, plan.leaves))] == \
        [tuple(np.asarray(nz.leaf_key(st.key, leaf))) for leaf in plan.leaves]
    for gen in (0, 1, 5):
        s = st.replace(generation=jnp.int32(gen))
        for m in range(8):
            handles = jax.tree_util.tree_leaves(es.noise(s, m), is_leaf=lambda h: isinstance(h, (nz.LowRank, nz.Full)))
            for leaf, h in zip(plan.leaves, handles):
                v = nz.draw(s.table, nz.leaf_key(st.key, leaf), jnp.int32(gen // 2), jnp.int32(m // 2), plan.size(leaf))
                if leaf.kind == nz.LOWRANK:
                    a, b = nz.split_factors(v, leaf.shape, rank)
                    np.testing.assert_array_equal(h.a, a)
                    np.testing.assert_array_equal(h.b, b)
                else:
                    np.testing.assert_array_equal(h.eps, v.reshape(leaf.shape))


def test_default_table_grows_with_population(key):
    p = {"w": jnp.zeros((64, 64))}
    small = eggroll.eggroll(256).init(key, p).table.shape[0]
    big = eggroll.eggroll(1 << 16).init(key, p).table.shape[0]
    assert small == nz.DEFAULT_TABLE_SIZE and big >= 256 * (1 << 15)
