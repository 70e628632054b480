"""EGG model and integer EGGROLL: perturbed forward == materialised perturbation, antithetic
noise, separator reset, the integer update (zero fitness, planted signal, brute-force Z, z-test
calibration)."""

import functools
import math
from typing import NamedTuple
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eggroll import int8 as i8
from eggroll import int8_strategy as ist
from eggroll import noise as nz
from eggroll.models import egg

RNG = np.random.default_rng(1)
SIGMA_SHIFT = 2  # large perturbations so that differences show at int8 resolution


class Update(NamedTuple):
    params: object
    momentum: object
    moved: object
    moved_leaves: object
    pair_fitness: object


@functools.partial(jax.jit, static_argnums=0, static_argnames=("mode", "var", "chunk", "stat", "momentum_bits"))
def _tell(plan, key, table, generation, params, fitness, *, mode, z16, var, chunk=None, stat="ab", momentum=None,
          momentum_bits=0, vector_z16=None):
    """The public integer tell on a hand-made noise context (this module's own table, a constant
    level z16), then int8.apply_steps."""
    es = ist.int8_eggroll(fitness.shape[0], 2.0 ** -SIGMA_SHIFT, plan.rank, fitness=mode, stat=stat,
                          momentum_bits=momentum_bits, update_chunk=chunk)
    levels = jnp.stack([jnp.asarray(z16, jnp.int32), jnp.asarray(z16 if vector_z16 is None else vector_z16, jnp.int32)])
    units = jnp.asarray([1 if stat == "sign" else var, round(math.sqrt(var))], jnp.int32)
    ctx = nz.NoiseContext(key, table, plan, {"z16": levels[None], "units": units})
    steps, state, m = es.tell(ctx, ist.IntESState(jnp.asarray(generation, jnp.int32), momentum), fitness)
    return Update(i8.apply_steps(params, steps), state.momentum, m["moved"], m["moved_leaves"],
                  ist.pair_fitness(fitness, mode))


def es_step(plan, key, table, generation, params, fitness, **kw):
    return _tell(plan, key, table, generation, params, fitness, **kw)


@pytest.fixture(scope="module")
def setup():
    key = jax.random.PRNGKey(3)
    params = egg.init_egg(key, 1, 16)
    plan = ist.make_plan(params, rank=2)
    table = ist.make_table(key, nz.required_table_size(plan, None, 8))
    return key, params, plan, table


def _mat_linear_acc(w, x, noise=None):
    """Reference: materialise E = sign A B^T (int64) and add shift_round(x E^T)."""
    acc = np.asarray(x, np.int64) @ np.asarray(w, np.int64).T
    if noise is None:
        return jnp.asarray(acc, jnp.int32)
    e = np.asarray(noise.materialize(), np.int64)
    p = np.asarray(x, np.int64) @ e.T
    return jnp.asarray(acc + np.floor(p / 2.0 ** noise.shift + 0.5).astype(np.int64), jnp.int32)


def _mat_embed(table, token, noise=None):
    row = np.asarray(table, np.int64)[np.asarray(token)]
    if noise is None:
        return jnp.asarray(row, jnp.int8)
    e = np.asarray(noise.materialize(), np.int64)[np.asarray(token)]
    return jnp.asarray(np.clip(row + np.floor(e / 2.0 ** noise.shift + 0.5), -127, 127), jnp.int8)


def test_linear_acc_equals_materialised(setup):
    key, params, plan, table = setup
    noise = ist.member_noise(plan, key, table, 0, 3, SIGMA_SHIFT)
    for name in ("wf", "uh", "w1", "w2"):
        w, n = params["layers"][0][name], noise["layers"][0][name]
        assert isinstance(n, i8.IntLowRank) and n.a.dtype == jnp.int8
        assert i8.pre_shift(w.shape[1], plan.rank) == 0
        x = jnp.asarray(RNG.integers(-127, 128, w.shape[1]), jnp.int8)
        np.testing.assert_array_equal(np.asarray(i8.linear_acc(w, x, n)), np.asarray(_mat_linear_acc(w, x, n)))
        assert not np.array_equal(np.asarray(i8.linear_acc(w, x, n)), np.asarray(i8.linear_acc(w, x)))


def test_large_fan_in_pre_shift_stays_close():
    n, m, r = 4096, 8, 2
    assert i8.pre_shift(n, r) > 0
    x = jnp.asarray(RNG.choice([-127, 127], n), jnp.int8)
    b = jnp.asarray(RNG.choice([-127, 127], (n, r)), jnp.int8)
    b = b * jnp.sign(x)[:, None].astype(jnp.int8)  # worst case: every product +16129
    a = jnp.asarray(RNG.choice([-127, 127], (m, r)), jnp.int8)
    noise = i8.IntLowRank(a, b, jnp.int32(1), ist.lowrank_shift(0, r))
    w = jnp.zeros((m, n), jnp.int8)
    got = np.asarray(i8.linear_acc(w, x, noise)).astype(np.int64)
    exact = (np.asarray(x, np.int64) @ np.asarray(b, np.int64) @ np.asarray(a, np.int64).T) / 2.0 ** noise.shift
    assert np.all(np.abs(got) < 2**31 - 1)
    pre = i8.pre_shift(n, r)
    # rounding x B to 2^pre costs at most 2^(pre-1) * sum_r |A| / 2^(shift-pre) + 1 per output
    assert np.all(np.abs(got - exact) <= 0.5 * 127 * r / 2.0 ** (noise.shift - pre) * 2 ** pre / 2 ** pre + 1)


def test_perturbed_model_equals_materialised_model(setup, monkeypatch):
    key, params, plan, table = setup
    tokens = jnp.asarray(RNG.integers(1, 256, 9), jnp.int32).at[4].set(0)
    noise = ist.member_noise(plan, key, table, 5, 6, SIGMA_SHIFT)
    h0 = jnp.asarray(RNG.integers(-60, 60, (1, 16)), jnp.int8)
    h_fast, s_fast, lp_fast = egg.sequence_logprob(params, h0, tokens, noise)
    _, s_plain, _ = egg.sequence_logprob(params, h0, tokens, None)
    monkeypatch.setattr(i8, "linear_acc", _mat_linear_acc)
    monkeypatch.setattr(i8, "embed", _mat_embed)
    with jax.disable_jit():
        h_ref, s_ref, lp_ref = egg.sequence_logprob(params, h0, tokens, noise)
    np.testing.assert_array_equal(np.asarray(lp_fast), np.asarray(lp_ref))
    np.testing.assert_array_equal(np.asarray(h_fast), np.asarray(h_ref))
    assert int(s_fast) == int(s_ref) and int(s_fast) != int(s_plain)


def test_antithetic_members_have_opposite_noise(setup):
    key, _params, plan, table = setup
    plus = ist.member_noise(plan, key, table, 2, 4, SIGMA_SHIFT)
    minus = ist.member_noise(plan, key, table, 2, 5, SIGMA_SHIFT)
    other = ist.member_noise(plan, key, table, 2, 6, SIGMA_SHIFT)
    e_p, e_m = plus["layers"][0]["wf"], minus["layers"][0]["wf"]
    np.testing.assert_array_equal(np.asarray(e_p.materialize()), -np.asarray(e_m.materialize()))
    assert not np.array_equal(np.asarray(e_p.a), np.asarray(other["layers"][0]["wf"].a))
    # same-shaped parameters get different noise
    assert not np.array_equal(np.asarray(e_p.a), np.asarray(plus["layers"][0]["wh"].a))
    assert int(plus["ln_out"].sign) == 1 and int(minus["ln_out"].sign) == -1


def test_separator_resets_hidden_state(setup):
    _, params, _, _ = setup
    h = jnp.asarray(RNG.integers(-100, 100, (1, 16)), jnp.int8)
    h1, l1 = egg.step(params, h, 0)
    h2, l2 = egg.step(params, jnp.zeros_like(h), 0)
    np.testing.assert_array_equal(np.asarray(h1), np.asarray(h2))
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))
    h3, _l3 = egg.step(params, h, 65)
    h4, _l4 = egg.step(params, jnp.zeros_like(h), 65)
    assert not np.array_equal(np.asarray(h3), np.asarray(h4))


def test_zero_residual_init_silences_the_mlp(setup):
    key, params, _, _ = setup
    p0 = egg.init_egg(key, 1, 16, residual_init="zero")
    assert not np.any(np.asarray(p0["layers"][0]["w2"]))
    np.testing.assert_array_equal(np.asarray(p0["layers"][0]["w1"]), np.asarray(params["layers"][0]["w1"]))
    u = jnp.asarray(RNG.integers(-127, 128, 16), jnp.int8)
    assert not np.any(np.asarray(egg.mlp(p0["layers"][0], u, None, egg.shape_of(p0).shifts)))
    with pytest.raises(ValueError, match="residual_init"):
        egg.init_egg(key, 1, 16, residual_init="small")


def test_model_is_integer_and_shapes(setup):
    _, params, _, _ = setup
    assert all(x.dtype == jnp.int8 for x in jax.tree_util.tree_leaves(params))
    h, logits = egg.step(params, egg.init_hidden(params), 42)
    assert h.dtype == jnp.int8 and h.shape == (1, 16) and logits.dtype == jnp.int8 and logits.shape == (256,)


# -- update ----------------------------------------------------------------------------------------
def _factors(plan, key, table, gen, members):
    """Every member's raw noise (a, b) or eps per leaf, stacked over members (one jitted vmap)."""
    def one(m):
        tree = ist.member_noise(plan, key, table, gen, m, SIGMA_SHIFT)
        leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda n: isinstance(n, (i8.IntLowRank, i8.IntFull)))
        return [(n.a, n.b) if isinstance(n, i8.IntLowRank) else n.eps for n in leaves]

    return jax.jit(jax.vmap(one))(jnp.asarray(members, jnp.int32))


def _bruteforce_z(plan, key, table, gen, pf):
    """sum_p f_p E_p with every member's noise materialised (per leaf, int64)."""
    f = np.asarray(pf, np.int64)
    out = []
    for z in _factors(plan, key, table, gen, 2 * np.arange(len(f))):
        if isinstance(z, tuple):
            a, b = np.asarray(z[0], np.int64), np.asarray(z[1], np.int64)
            out.append(np.einsum("p,pir,pjr->ij", f, a, b))
        else:
            out.append(np.einsum("p,pi->i", f, np.asarray(z, np.int64)))
    return out


def test_update_statistic_matches_bruteforce(setup):
    key, _params, plan, table = setup
    pf = jnp.asarray(RNG.integers(-8, 9, 6), jnp.int32)
    stats = ist.update_statistic(plan, key, table, 7, pf, chunk=2)
    ref = _bruteforce_z(plan, key, table, 7, pf)
    for z, r in zip(jax.tree_util.tree_leaves(stats), ref):
        assert z.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(z), r)


def test_zero_fitness_moves_nothing(setup):
    key, params, plan, table = setup
    var = ist.table_variance(table)
    fitness = jnp.full((12,), -1234, jnp.int32)  # every pair ties: f+ - f- = 0
    for mode in ist.FITNESS_MODES:
        new, _, moved, _, pf = es_step(plan, key, table, 0, params, fitness, mode=mode, z16=0, var=var)
        assert int(moved) == 0 and not np.any(np.asarray(pf))
        for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_zero_statistic_never_moves_even_at_alpha_one():
    params = {"w": jnp.zeros((3, 3), jnp.int8)}
    z = {"w": jnp.asarray([[0, 5, -2], [0, 0, 1], [0, 0, 0]], jnp.int32)}
    steps, per_leaf = ist.steps_of([z["w"]], [jnp.int32(0)])
    assert [int(m) for m in per_leaf] == [3]
    new = i8.apply_steps(params, {"w": steps[0]})
    np.testing.assert_array_equal(np.asarray(new["w"]), np.sign(np.asarray(z["w"])))
    sat = i8.apply_steps({"w": jnp.full((1, 2), 127, jnp.int8)}, {"w": jnp.asarray([[1, -1]], jnp.int8)})
    np.testing.assert_array_equal(np.asarray(sat["w"]), [[127, 126]])


def test_planted_signal_moves_the_right_parameters(setup):
    """Fitness = sign of the noise on one weight entry and one bias entry: a strict z-test moves
    those entries (in the right direction) and almost nothing else."""
    key, params, plan, table = setup
    n_pairs, gen = 256, 11
    leaves = [leaf.path for leaf in plan.leaves]
    z = _factors(plan, key, table, gen, 2 * np.arange(n_pairs))
    a, b = (np.asarray(t, np.int64) for t in z[leaves.index("['layers'][0]['wh']")])
    e = np.einsum("pr,pr->p", a[:, 3], b[:, 5])
    v = np.asarray(z[leaves.index("['layers'][0]['bf']")], np.int64)[:, 2]
    # half the pairs carry the matrix entry's sign, half the bias entry's
    pf = np.where(np.arange(n_pairs) % 2 == 0, np.sign(e), np.sign(v))
    pf = jnp.asarray(pf, jnp.int32)
    fitness = jnp.stack([pf, jnp.zeros_like(pf)], 1).reshape(-1)  # f+ - f- = pf
    alpha = 1e-6
    new, _, moved, _, got_pf = es_step(plan, key, table, gen, params, fitness, mode="sign",
                                       z16=ist.z16_of_alpha(alpha), var=ist.table_variance(table))
    np.testing.assert_array_equal(np.asarray(got_pf), np.asarray(pf))
    d_wh = np.asarray(new["layers"][0]["wh"], np.int32) - np.asarray(params["layers"][0]["wh"], np.int32)
    d_bf = np.asarray(new["layers"][0]["bf"], np.int32) - np.asarray(params["layers"][0]["bf"], np.int32)
    assert d_wh[3, 5] == 1 and d_bf[2] == 1
    assert int(moved) <= 6  # the two planted entries plus at most a few correlated ones


def test_z_test_false_positive_rate_matches_alpha(setup):
    key, params, plan, table = setup
    var = ist.table_variance(table)
    total = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
    for alpha in (0.5, 0.05):
        rates = []
        for seed in range(3):
            r = np.random.default_rng(seed)
            fitness = jnp.asarray(r.integers(-1000, 1000, 512), jnp.int32)  # pure noise
            moved = es_step(plan, key, table, 100 + seed, params, fitness, mode="norm",
                            z16=ist.z16_of_alpha(alpha), var=var).moved
            rates.append(int(moved) / total)
        assert abs(np.mean(rates) - alpha) < 0.25 * alpha + 0.01, (alpha, rates)


def test_isqrt_and_threshold():
    n = np.concatenate([np.arange(2000), RNG.integers(0, 2**31 - 1, 3000)])
    np.testing.assert_array_equal(np.asarray(ist.isqrt(jnp.asarray(n, jnp.int32))), [math.isqrt(int(v)) for v in n])
    pf = jnp.asarray(RNG.integers(-8, 9, 300), jnp.int32)
    z = NormalDist().inv_cdf(1 - 0.01 / 2)
    exact = z * math.sqrt(float(np.sum(np.asarray(pf) ** 2)) * 2) * 256
    got = int(ist.threshold(pf, 2, 256, ist.z16_of_alpha(0.01)))
    assert abs(got - exact) / exact < 0.02  # z rounded to 1/16, sqrt to 1/16
    assert ist.z16_of_alpha(1.0) == 0 and int(ist.threshold(pf, 1, 256, 0)) == 0


def test_pair_fitness_modes():
    f = jnp.asarray([10, 4, 3, 3, -5, 20, 100, 0], jnp.int32)  # differences 6, 0, -25, 100
    np.testing.assert_array_equal(np.asarray(ist.pair_fitness(f, "sign")), [1, 0, -1, 1])
    d = np.array([6, 0, -25, 100])
    scale = round(np.abs(d).mean())
    ref = np.clip(np.floor(4 * d / scale + 0.5), -8, 8)
    np.testing.assert_array_equal(np.asarray(ist.pair_fitness(f, "norm")), ref)
    with pytest.raises(ValueError, match="fitness mode"):
        ist.pair_fitness(f, "rank")


def test_float_params_are_rejected():
    with pytest.raises(TypeError, match="int8"):
        ist.make_plan({"w": jnp.zeros((2, 2))}, rank=1)


def test_alpha_schedule():
    assert ist.alpha_at(1.0, 0, 50, 100) == 1.0
    assert ist.alpha_at(1.0, 4, 0, 100) == 1.0
    assert math.isclose(ist.alpha_at(1.0, 4, 100, 100), 2**-4)
    assert math.isclose(ist.alpha_at(0.5, 2, 50, 100), 0.25)
    # hyperbolic: same end points, 1 / (1 + (2^d - 1) g / G) in between (higher than exp at the middle)
    assert ist.alpha_at(1.0, 4, 0, 100, "hyperbolic") == 1.0
    assert math.isclose(ist.alpha_at(1.0, 4, 100, 100, "hyperbolic"), 2**-4)
    assert math.isclose(ist.alpha_at(1.0, 4, 50, 100, "hyperbolic"), 1 / 8.5)
    with pytest.raises(ValueError, match="schedule"):
        ist.alpha_at(1.0, 4, 50, 100, "linear")
    with pytest.raises(ValueError, match="alpha"):
        ist.z16_of_alpha(0.0)


@pytest.mark.parametrize("arch", [egg.Arch("joint"), egg.Arch("split")])
def test_window_forward_equals_byte_by_byte(setup, arch):
    """window_logprob (input matmuls batched over the window) == scanning `step`, bit for bit,
    with and without noise, across separators, for a 2-layer model."""
    key, _, _, _ = setup
    params = egg.init_egg(jax.random.PRNGKey(8), 2, 16)
    plan = ist.make_plan(params, rank=2)
    table = ist.make_table(key, nz.required_table_size(plan, None, 8))
    tokens = jnp.asarray(RNG.integers(0, 256, 30), jnp.int32).at[5].set(0).at[17].set(0)
    h0 = jnp.asarray(RNG.integers(-60, 60, (2, 16)), jnp.int8)
    for member in (None, 3):
        noise = None if member is None else ist.member_noise(plan, key, table, 1, member, SIGMA_SHIFT)
        ref = egg.sequence_logprob(params, h0, tokens, noise, arch)
        got = egg.window_logprob(params, h0, tokens, noise, arch)
        for r, g in zip(ref, got):
            np.testing.assert_array_equal(np.asarray(r), np.asarray(g))
    other = egg.Arch("split" if arch.gru_shift == "joint" else "joint")
    assert int(egg.window_logprob(params, h0, tokens, None, other)[1]) != int(ref[1])


def test_split_gru_shift_rescales_each_product():
    """split: f = sat(round(W u / 2^s_d) + round(U h / 2^s_d) + b), checked against NumPy."""
    params = egg.init_egg(jax.random.PRNGKey(2), 1, 16)
    p = params["layers"][0]
    shifts = egg.shape_of(params).shifts
    u = jnp.asarray(RNG.integers(-40, 40, 16), jnp.int8)
    h = jnp.asarray(RNG.integers(-40, 40, 16), jnp.int8)
    got = egg.gru(p, u, h, None, shifts, egg.Arch("split"))

    def rnd(x, s):
        return np.floor(x / 2.0 ** s + 0.5).astype(np.int64)

    W = {k: np.asarray(p[k], np.int64) for k in ("wf", "uf", "wh", "uh")}
    un, hn = np.asarray(u, np.int64), np.asarray(h, np.int64)
    f = np.clip(rnd(W["wf"] @ un, shifts["d"]) + rnd(W["uf"] @ hn, shifts["d"]), -127, 127)
    gate = f + 127
    g = (gate * hn) >> 8
    cand = np.clip(rnd(W["wh"] @ un, shifts["d"]) + rnd(W["uh"] @ g, shifts["d"]), -127, 127)
    ref = np.clip(hn + ((gate * (cand - hn)) >> 8), -127, 127)
    np.testing.assert_array_equal(np.asarray(got), ref)


def test_sign_statistic_matches_bruteforce(setup):
    key, _params, plan, table = setup
    pf = jnp.asarray(RNG.integers(-8, 9, 6), jnp.int32)
    stats = ist.update_statistic(plan, key, table, 7, pf, chunk=3, stat="sign")
    z = _factors(plan, key, table, 7, 2 * np.arange(6))
    for leaf, got, fac in zip(plan.leaves, jax.tree_util.tree_leaves(stats), z):
        if leaf.kind == nz.LOWRANK:
            a, b = (np.sign(np.asarray(t, np.int64)) for t in fac)
            ref = np.einsum("p,pir,pjr->ij", np.asarray(pf, np.int64), a, b)
        else:
            ref = np.einsum("p,p...->...", np.asarray(pf, np.int64), np.asarray(fac, np.int64))
        np.testing.assert_array_equal(np.asarray(got), ref)


def test_momentum_accumulates_and_its_null_rate_matches_alpha(setup):
    """M <- M - round(M / 2^k) + Z exactly; under pure-noise fitness the stationary fraction of
    entries passing the momentum-scaled z-test is about alpha."""
    key, params, plan, table = setup
    var = ist.table_variance(table)
    m = {"w": jnp.asarray([[100, -100, 7]], jnp.int32)}
    z = {"w": jnp.asarray([[1, 2, -3]], jnp.int32)}
    got = ist.accumulate(m, z, 3)["w"]
    np.testing.assert_array_equal(np.asarray(got), [[100 - 13 + 1, -100 + 12 + 2, 7 - 1 - 3]])
    assert ist.momentum_scale16(0) == 16 and ist.momentum_scale16(3) == round(16 * math.sqrt(1 / (1 - (7 / 8) ** 2)))
    total = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
    mom, rates, alpha, bits = ist.zero_momentum(plan), [], 0.1, 3
    r = np.random.default_rng(0)
    for gen in range(40):
        fitness = jnp.asarray(r.integers(-1000, 1000, 256), jnp.int32)
        up = es_step(plan, key, table, gen, params, fitness, mode="norm", z16=ist.z16_of_alpha(alpha), var=var,
                     momentum=mom, momentum_bits=bits)
        mom = up.momentum
        if gen >= 24:  # after ~3 time constants (2^3 generations each)
            rates.append(int(up.moved) / total)
    assert abs(np.mean(rates) - alpha) < 0.3 * alpha, rates


def test_vector_sigma_shift_is_separate(setup):
    key, _params, plan, table = setup
    noise = ist.member_noise(plan, key, table, 0, 3, SIGMA_SHIFT, vector_sigma_shift=SIGMA_SHIFT + 3)
    assert noise["layers"][0]["bf"].shift == SIGMA_SHIFT + 3
    assert noise["layers"][0]["wf"].shift == ist.lowrank_shift(SIGMA_SHIFT, plan.rank)


def test_model_without_mlp_blocks(setup):
    key, params, _, _ = setup
    p0 = egg.init_egg(jax.random.PRNGKey(3), 1, 16, mlp_mult=0)
    assert "w1" not in p0["layers"][0] and egg.shape_of(p0).mlp_hidden == 0
    np.testing.assert_array_equal(np.asarray(p0["layers"][0]["wf"]), np.asarray(params["layers"][0]["wf"]))
    plan = ist.make_plan(p0, rank=1)
    table = ist.make_table(key, nz.required_table_size(plan, None, 4))
    tokens = jnp.asarray(RNG.integers(0, 256, 12), jnp.int32)
    noise = ist.member_noise(plan, key, table, 0, 1, SIGMA_SHIFT)
    ref, got = egg.sequence_logprob(p0, egg.init_hidden(p0), tokens, noise), egg.window_logprob(p0, egg.init_hidden(p0), tokens, noise)
    np.testing.assert_array_equal(np.asarray(ref[2]), np.asarray(got[2]))
    with pytest.raises(ValueError, match="mlp_mult"):
        egg.init_egg(key, 1, 16, mlp_mult=-1)
