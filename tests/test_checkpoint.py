"""Checkpoint round trips and exact resume of a training loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eggroll
from eggroll.models.mlp import init_mlp, mlp

N = 16


def setup(key):
    params = init_mlp(key, (3, 8, 2))
    es = eggroll.eggroll(N, sigma=0.1, table_size=1 << 16)
    opt = optax.adamw(0.01)
    x = jax.random.normal(key, (N, 3))

    @jax.jit
    def step(params, st, os):
        f = eggroll.evaluate_population(lambda m: -jnp.sum((mlp(params, x[m], es.noise(st, m)) - 1.0) ** 2), N)
        g, st, _ = es.tell(st, f)
        upd, os = opt.update(g, os, params)
        return optax.apply_updates(params, upd), st, os

    return params, es, opt, step


def test_save_kill_resume_is_bitwise(key, tmp_path):
    params, es, opt, step = setup(key)
    state = (params, es.init(key, params), opt.init(params))
    for _ in range(6):
        state = jax.block_until_ready(step(*state))  # sync: see test_strategy._train
    uninterrupted = state

    state = (params, es.init(key, params), opt.init(params))
    for _ in range(3):
        state = jax.block_until_ready(step(*state))  # sync: see test_strategy._train
    eggroll.save_checkpoint(tmp_path / "ckpt", {"params": state[0], "es": state[1], "opt": state[2]}, {"generation": 3})
    del state  # "kill"
    fresh = (params, es.init(key, params), opt.init(params))
    tree, meta = eggroll.load_checkpoint(tmp_path / "ckpt", {"params": fresh[0], "es": fresh[1], "opt": fresh[2]})
    assert meta == {"generation": 3} and int(tree["es"].generation) == 3
    state = (tree["params"], tree["es"], tree["opt"])
    for _ in range(3):
        state = jax.block_until_ready(step(*state))  # sync: see test_strategy._train
    for a, b in zip(jax.tree_util.tree_leaves(uninterrupted), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_noise_table_not_saved_and_dtypes_roundtrip(key, tmp_path):
    params = {"w": jnp.ones((3, 2), jnp.bfloat16), "n": jnp.arange(3, dtype=jnp.int32)}
    es = eggroll.eggroll(4, table_size=1 << 16)
    st = es.init(key, {"w": jnp.ones((3, 2))})
    eggroll.save_checkpoint(tmp_path / "c", {"p": params, "es": st})
    assert (tmp_path / "c" / "arrays.safetensors").stat().st_size < 10_000  # no 2^16-float table
    tree, _ = eggroll.load_checkpoint(tmp_path / "c", {"p": params, "es": st})
    assert tree["p"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(tree["p"]["n"]), [0, 1, 2])
    np.testing.assert_array_equal(np.asarray(tree["es"].table), np.asarray(st.table))


def test_mismatch_errors_name_tensors(key, tmp_path):
    eggroll.save_checkpoint(tmp_path / "c", {"a": jnp.zeros(3), "b": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"missing: \[\"\['z'\]\"\].*unexpected: \[\"\['b'\]\"\]"):
        eggroll.load_checkpoint(tmp_path / "c", {"a": jnp.zeros(3), "z": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"\['a'\]: checkpoint float32\[3\] vs expected float32\[4\]"):
        eggroll.load_checkpoint(tmp_path / "c", {"a": jnp.zeros(4), "b": jnp.zeros(2)})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        eggroll.load_checkpoint(tmp_path / "nothing", {"a": jnp.zeros(3)})


def test_config_mismatch_names_each_changed_field():
    import dataclasses

    from eggroll.checkpoint import config_mismatch

    @dataclasses.dataclass
    class Cfg:
        lr: float = 0.1
        seed: int = 0
        steps: int = 10

    saved = dataclasses.asdict(Cfg(lr=0.2, steps=99))
    assert config_mismatch(Cfg(), saved, ("lr", "seed")) == ["lr: checkpoint 0.2 vs now 0.1"]
    assert config_mismatch(Cfg(lr=0.2), saved, ("lr", "seed")) == []
