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


def test_offsets_of_one_generation_never_overlap():
    """Consecutive pairs read consecutive slices: one leaf's directions share no table entry."""
    lk = jnp.asarray([[1, 2], [3, 4]], jnp.uint32)
    size, span = 37, (1 << 16) - 37 + 1
    offs = np.asarray(nz.table_offset(lk[:, None, :], jnp.int32(5), jnp.arange(1000)[None, :], span, size))
    assert offs.shape == (2, 1000) and (offs >= 0).all() and (offs < span).all()
    for row in offs:
        starts = np.sort(row)
        gaps = np.diff(np.concatenate([starts, [starts[0] + span]]))  # cyclic
        assert (gaps >= size).all()
    assert not np.array_equal(offs[0], offs[1])  # each leaf has its own base
    other_epoch = np.asarray(nz.table_offset(lk[:1], jnp.int32(6), 0, span, size))
    assert int(other_epoch[0]) != int(offs[0, 0])


def test_bases_are_roughly_uniform():
    keys = jax.random.split(jax.random.PRNGKey(1), 100_000)
    counts = np.bincount(np.asarray(nz.table_offset(keys, 0, 0, 100, 7)), minlength=100)
    assert counts.min() > 800 and counts.max() < 1200  # expected 1000 each


@pytest.mark.parametrize("rank", [1, 3])
def test_member_noise_equals_reference_draw(key, rank):
    es = eggroll.eggroll(8, rank=rank, table_size=1 << 12, noise_reuse=2)
    ctx = es.setup(key, params())
    st = es.init(ctx)
    plan = ctx.plan
    assert [tuple(k) for k in np.asarray(nz.leaf_keys(ctx.key, plan.leaves))] == \
        [tuple(np.asarray(nz.leaf_key(ctx.key, leaf))) for leaf in plan.leaves]
    for gen in (0, 1, 5):
        s = st._replace(generation=jnp.int32(gen))
        for m in range(8):
            handles = jax.tree_util.tree_leaves(es.noise(ctx, s, m), is_leaf=lambda h: isinstance(h, (nz.LowRank, nz.Full)))
            for leaf, h in zip(plan.leaves, handles):
                v = nz.draw(ctx.table, nz.leaf_key(ctx.key, leaf), jnp.int32(gen // 2), jnp.int32(m // 2), plan.size(leaf))
                if leaf.kind == nz.LOWRANK:
                    a, b = nz.split_factors(v, leaf.shape, rank)
                    np.testing.assert_array_equal(h.a, a)
                    np.testing.assert_array_equal(h.b, b)
                else:
                    np.testing.assert_array_equal(h.eps, v.reshape(leaf.shape))


def test_default_table_grows_with_population(key):
    p = {"w": jnp.zeros((64, 64))}
    small = eggroll.eggroll(256).setup(key, p).table.shape[0]
    big = eggroll.eggroll(1 << 16).setup(key, p).table.shape[0]
    assert small == nz.DEFAULT_TABLE_SIZE and big >= 256 * (1 << 15)
