"""Transformer + sampler: KV-cache decoding vs full recomputation, perturbed generation vs the
explicitly materialised member weights, left padding, EOS, temperature sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eggroll
from eggroll import sampling
from eggroll import noise as nz
from eggroll.models import transformer as tfm

CFG = tfm.TransformerConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8, intermediate_size=40, qkv_bias=True, qk_norm=True, tie_embeddings=True)
LLAMA = tfm.TransformerConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=1,
                              head_dim=8, intermediate_size=40, rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
PROMPTS = np.array([[0, 0, 0, 5, 7], [1, 2, 3, 4, 6], [0, 9, 8, 9, 2], [0, 0, 11, 12, 13]], np.int32)
LENS = np.array([2, 5, 4, 3], np.int32)
NEW = 6


@pytest.fixture(scope="module")
def model():
    return tfm.init_params(jax.random.PRNGKey(3), CFG, std=0.3)


# one layer, untied head: every kind of leaf once (noise compile time grows with the leaf count)
SMALL = tfm.TransformerConfig(vocab_size=61, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                              head_dim=8, intermediate_size=40, qkv_bias=True, qk_norm=True)


@pytest.fixture(scope="module")
def small_es():
    params = tfm.init_params(jax.random.PRNGKey(5), SMALL, std=0.3)
    es = eggroll.eggroll(8, sigma=0.3, rank=2, table_size=1 << 16)
    ctx = es.setup(jax.random.PRNGKey(4), params)
    return params, es, ctx, es.init(ctx)


@pytest.mark.parametrize("cfg", [CFG, LLAMA], ids=["qwen-like", "llama3-rope"])
def test_kv_cache_equals_full_recomputation(cfg):
    params = tfm.init_params(jax.random.PRNGKey(0), cfg, std=0.3)
    toks = jnp.array([0, 0, 5, 7, 9, 11, 3, 2, 40], jnp.int32)
    pos = jnp.arange(9) - 2  # two left pads
    fwd = jax.jit(tfm.forward, static_argnums=1)
    full, _ = fwd(params, cfg, toks, pos)
    cache = tfm.init_cache(cfg, 12)
    pieces = []
    for lo, hi in [(0, 5), (5, 6), (6, 8), (8, 9)]:  # prefill, then 1-2 tokens per step
        out, cache = fwd(params, cfg, toks[lo:hi], pos[lo:hi], cache=cache, cache_index=lo)
        pieces.append(out)
    np.testing.assert_allclose(np.concatenate(pieces)[2:], full[2:], atol=1e-5, rtol=1e-5)
    # padding is invisible: the same tokens without pads give the same logits
    unpadded, _ = fwd(params, cfg, toks[2:], jnp.arange(7))
    np.testing.assert_allclose(full[2:], unpadded, atol=1e-5, rtol=1e-5)


def _check_against_full(params, prompts, lens, gen):
    """Greedy tokens from the cached sampler == argmax of a full recomputation of each row."""
    for b in range(prompts.shape[0]):
        seq = np.concatenate([prompts[b], np.asarray(gen.tokens[b])])
        pos = np.arange(seq.size) - (prompts.shape[1] - lens[b])
        logits, _ = jax.jit(tfm.forward, static_argnums=1)(params, CFG, seq, pos)
        want = np.argmax(np.asarray(logits)[prompts.shape[1] - 1:-1], -1)
        np.testing.assert_array_equal(np.asarray(gen.tokens[b]), want)


def test_greedy_generation_equals_full_recomputation(model):
    gen = sampling.generate(model, CFG, PROMPTS, LENS, max_new_tokens=NEW)
    assert gen.tokens.shape == (4, NEW) and not bool(gen.finished.any())
    np.testing.assert_array_equal(gen.lengths, NEW)
    _check_against_full(model, PROMPTS, LENS, gen)


def test_perturbed_generation_equals_materialised_member(small_es):
    model, es, ctx, st = small_es
    members = np.array([0, 5, 3, -1], np.int32)  # -1: the unperturbed model in the same batch
    gen = sampling.generate(model, SMALL, PROMPTS, LENS, max_new_tokens=NEW, noise_fn=es.noise, noise_args=(ctx, st),
                            member_ids=members)
    member_weights = jax.jit(lambda m: jax.tree_util.tree_map(jnp.add, model, eggroll.materialize(es.noise(ctx, st, m))))
    differs = 0
    for b, m in enumerate(members):
        w = member_weights(m) if m >= 0 else model
        ref = sampling.generate(w, SMALL, PROMPTS[b:b + 1], LENS[b:b + 1], max_new_tokens=NEW)
        np.testing.assert_array_equal(gen.tokens[b], ref.tokens[0])
        plain = sampling.generate(model, SMALL, PROMPTS[b:b + 1], LENS[b:b + 1], max_new_tokens=NEW)
        differs += int((np.asarray(plain.tokens[0]) != np.asarray(gen.tokens[b])).any())
    assert differs >= 2, "noise at sigma 0.3 should change some members' greedy outputs"
    # grouped rows (rows_per_member=2: one set of factors per member) give the same tokens
    grouped = sampling.generate(model, SMALL, PROMPTS, LENS, max_new_tokens=NEW, noise_fn=es.noise,
                                noise_args=(ctx, st), member_ids=np.array([5, 5, -1, -1], np.int32), rows_per_member=2)
    for b, m in enumerate([5, 5, -1, -1]):
        w = member_weights(m) if m >= 0 else model
        ref = sampling.generate(w, SMALL, PROMPTS[b:b + 1], LENS[b:b + 1], max_new_tokens=NEW)
        np.testing.assert_array_equal(grouped.tokens[b], ref.tokens[0])
    with pytest.raises(ValueError, match="share one member"):
        sampling.generate(model, SMALL, PROMPTS, LENS, max_new_tokens=NEW, noise_fn=es.noise, noise_args=(ctx, st),
                          member_ids=members, rows_per_member=2)


@pytest.mark.parametrize("antithetic", [True, False])
def test_bucketed_noise_equals_per_leaf_draws(antithetic):
    """es.noise draws same-shaped leaves in one vmapped gather (noise.member_directions); every
    leaf's factors equal its own unbucketed noise.direction_noise draw, bit for bit."""
    shapes = {"a": (6, 5), "b": (6, 5), "c": (5, 6), "v": (7,), "w": (7,), "s": (3, 2, 2)}
    params = {k: jnp.ones(v) for k, v in shapes.items()}
    es = eggroll.eggroll(8, sigma=0.3, rank=2, antithetic=antithetic, table_size=1 << 12)
    ctx = es.setup(jax.random.PRNGKey(2), params)
    st = es.init(ctx)
    plan = ctx.plan
    for m in range(8):
        got = jax.tree_util.tree_leaves(es.noise(ctx, st, m), is_leaf=lambda n: isinstance(n, (nz.LowRank, nz.Full)))
        pair, sign = nz.member_coords(plan, m)
        for leaf, handle in zip(plan.leaves, got):
            ref = nz.direction_noise(plan, ctx.table, nz.leaf_key(ctx.key, leaf), 0, pair, leaf)
            for x, y in zip(jax.tree_util.tree_leaves(ref), list(handle)[:-1]):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_eos_stops_rows_and_pads(model):
    free = sampling.generate(model, CFG, PROMPTS, LENS, max_new_tokens=NEW)
    eos = int(free.tokens[1, 2])  # row 1 emits it at step 2 (maybe others earlier)
    gen = sampling.generate(model, CFG, PROMPTS, LENS, max_new_tokens=NEW, eos_ids=(eos,), pad_id=-7)
    for b in range(4):
        row = np.asarray(free.tokens[b])
        hit = np.flatnonzero(row == eos)
        n = hit[0] + 1 if hit.size else NEW
        assert int(gen.lengths[b]) == n and bool(gen.finished[b]) == bool(hit.size)
        np.testing.assert_array_equal(gen.tokens[b, :n], row[:n])
        assert (np.asarray(gen.tokens[b, n:]) == -7).all()
    assert int(gen.lengths[1]) <= 3


def test_temperature_sampling_reproducible_and_varied(model):
    kw = {"max_new_tokens": NEW, "temperature": 5.0}
    prompts = np.repeat(PROMPTS[1:2], 8, axis=0)
    lens = np.repeat(LENS[1:2], 8)
    a = sampling.generate(model, CFG, prompts, lens, key=jax.random.PRNGKey(1), **kw)
    b = sampling.generate(model, CFG, prompts, lens, key=jax.random.PRNGKey(1), **kw)
    c = sampling.generate(model, CFG, prompts, lens, key=jax.random.PRNGKey(2), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert len({tuple(r) for r in np.asarray(a.tokens).tolist()}) > 1  # rows sample independently
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()


def test_bad_inputs_name_the_problem(model):
    with pytest.raises(ValueError, match="member_ids"):
        sampling.generate(model, CFG, PROMPTS, LENS, max_new_tokens=2, noise_fn=lambda m: None)
    with pytest.raises(ValueError, match="prompt_lengths"):
        sampling.generate(model, CFG, PROMPTS, LENS[:2], max_new_tokens=2)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tfm.TransformerConfig(vocab_size=8, hidden_size=8, num_layers=1, num_heads=3, num_kv_heads=2,
                              head_dim=4, intermediate_size=8)


def test_truncate_at_stop():
    assert sampling.truncate_at_stop("a+b=3</answer> junk", ["</answer>", "\n\n"]) == ("a+b=3", True)
    assert sampling.truncate_at_stop("no stop", ["</answer>"]) == ("no stop", False)


def test_recurrent_decoder_plugs_into_the_sampler():
    """A toy recurrent model (state instead of a KV cache, like RWKV-7) through the same sampler:
    equals a hand-written token-by-token loop; left padding (position < 0) leaves the state alone."""
    v, d = 13, 6
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
    params = {"emb": jax.random.normal(k1, (v, d)), "w": jax.random.normal(k2, (d, d)) / 2,
              "out": jax.random.normal(k3, (v, d))}

    def cell(p, h, tok):
        return jnp.tanh(p["w"] @ h + p["emb"][tok])

    def step(p, tokens, positions, noise, h, index):
        def one(h, tp):
            tok, pos = tp
            return jnp.where(pos >= 0, cell(p, h, tok), h), None
        h, _ = jax.lax.scan(one, h, (tokens, positions))
        return p["out"] @ h, h

    dec = sampling.Decoder(lambda max_len: jnp.zeros(d), step)
    prompts = np.array([[0, 0, 3, 4], [1, 2, 5, 6]], np.int32)
    lens = np.array([2, 4], np.int32)
    gen = sampling.generate(params, "toy-rnn", prompts, lens, max_new_tokens=5, decoder=dec)
    for b in range(2):
        h = jnp.zeros(d)
        for tok in prompts[b, 4 - lens[b]:]:
            h = cell(params, h, tok)
        want = []
        for _ in range(5):
            want.append(int(jnp.argmax(params["out"] @ h)))
            h = cell(params, h, want[-1])
        np.testing.assert_array_equal(gen.tokens[b], want)
