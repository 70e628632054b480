"""Checkpoint round trips and exact resume of a training loop."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eggroll
from eggroll.checkpoint import CheckpointError, checkpoint_exists, load_checkpoint, read_metadata, save_checkpoint
from eggroll.models.mlp import init_mlp, mlp

N = 16


def setup(key):
    params = init_mlp(key, (3, 8, 2))
    es = eggroll.eggroll(N, sigma=0.1, table_size=1 << 16)
    opt = optax.adamw(0.01)
    x = jax.random.normal(key, (N, 3))

    ctx = es.setup(key, params)  # rebuilt from the seed on resume, never saved

    @jax.jit
    def step(ctx, params, st, os):
        f = eggroll.evaluate_population(lambda m: -jnp.sum((mlp(params, x[m], es.noise(ctx, st, m)) - 1.0) ** 2), N)
        g, st, _ = es.tell(ctx, st, f)
        upd, os = opt.update(g, os, params)
        return optax.apply_updates(params, upd), st, os

    return params, es, opt, lambda *state: step(ctx, *state), ctx


def test_save_kill_resume_is_bitwise(key, tmp_path):
    params, es, opt, step, ctx = setup(key)
    state = (params, es.init(ctx), opt.init(params))
    for _ in range(6):
        state = jax.block_until_ready(step(*state))  # sync: see test_strategy._train
    uninterrupted = state

    state = (params, es.init(ctx), opt.init(params))
    for _ in range(3):
        state = jax.block_until_ready(step(*state))  # sync: see test_strategy._train
    eggroll.save_checkpoint(tmp_path / "ckpt", {"params": state[0], "es": state[1], "opt": state[2]}, {"generation": 3})
    del state  # "kill"
    fresh = (params, es.init(ctx), opt.init(params))
    tree, meta = eggroll.load_checkpoint(tmp_path / "ckpt", {"params": fresh[0], "es": fresh[1], "opt": fresh[2]})
    assert meta == {"generation": 3} and int(tree["es"].generation) == 3
    state = (tree["params"], tree["es"], tree["opt"])
    for _ in range(3):
        state = jax.block_until_ready(step(*state))  # sync: see test_strategy._train
    for a, b in zip(jax.tree_util.tree_leaves(uninterrupted), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_es_state_and_dtypes_roundtrip(key, tmp_path):
    params = {"w": jnp.ones((3, 2), jnp.bfloat16), "n": jnp.arange(3, dtype=jnp.int32)}
    es = eggroll.eggroll(4, table_size=1 << 16)
    st = es.init(es.setup(key, {"w": jnp.ones((3, 2))}))
    eggroll.save_checkpoint(tmp_path / "c", {"p": params, "es": st})
    tree, _ = eggroll.load_checkpoint(tmp_path / "c", {"p": params, "es": st})
    assert tree["p"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(tree["p"]["n"]), [0, 1, 2])
    assert type(tree["es"]) is type(st)
    for a, b in zip(jax.tree_util.tree_leaves(tree["es"]), jax.tree_util.tree_leaves(st)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@jax.tree_util.register_pytree_with_keys_class
class Box:
    def __init__(self, a, b):
        self.a, self.b = a, b

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("a"), self.a), (jax.tree_util.GetAttrKey("b"), self.b)), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def test_none_leaves_and_custom_nodes_roundtrip(tmp_path):
    tree = {"box": Box(jnp.arange(2.0), None), "none": None, "s": jnp.int32(7)}
    eggroll.save_checkpoint(tmp_path / "c", tree, {"k": [1, 2]})
    out, meta = eggroll.load_checkpoint(tmp_path / "c", tree)
    assert meta == {"k": [1, 2]} and out["none"] is None and out["box"].b is None
    np.testing.assert_array_equal(np.asarray(out["box"].a), [0.0, 1.0])
    assert out["s"].shape == () and int(out["s"]) == 7


def _saved(tmp_path):
    tree = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    eggroll.save_checkpoint(tmp_path / "c", tree, {"step": 5})
    return tmp_path / "c", tree


def _load_error(directory, tree, *in_message) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory, tree)
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    for part in in_message:
        assert str(part) in msg, msg
    return msg


def test_checkpoint_error_is_a_value_error():  # so the CLI prints it as one "error:" line, exit 2
    assert issubclass(CheckpointError, ValueError)


def test_truncated_arrays(tmp_path):
    d, tree = _saved(tmp_path)
    with open(d / "arrays.safetensors", "r+b") as f:
        f.truncate(100)
    msg = _load_error(d, tree, d / "arrays.safetensors", "truncated or corrupted", "delete")
    assert "run-dir" in msg and "backup" in msg


def test_garbage_arrays(tmp_path):
    d, tree = _saved(tmp_path)
    (d / "arrays.safetensors").write_bytes(b"\xff" * 64 + b"garbage")
    _load_error(d, tree, d / "arrays.safetensors", "truncated or corrupted")


def test_meta_not_json(tmp_path):
    d, tree = _saved(tmp_path)
    (d / "meta.json").write_text("not json\x01")
    _load_error(d, tree, d / "meta.json", "not valid JSON")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_metadata(d)


def test_meta_wrong_shape(tmp_path):
    d, tree = _saved(tmp_path)
    (d / "meta.json").write_text('{"metadata": {}}')
    _load_error(d, tree, d / "meta.json", '"dtypes"')
    (d / "meta.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not an eggroll checkpoint meta"):
        read_metadata(d)


def test_missing_files(tmp_path):
    d, tree = _saved(tmp_path)
    (d / "meta.json").unlink()
    _load_error(d, tree, d / "meta.json", "missing")
    assert checkpoint_exists(d)  # broken, not absent: a resume must fail, not start over
    d, tree = _saved(tmp_path / "x")
    (d / "arrays.safetensors").unlink()
    _load_error(d, tree, d / "arrays.safetensors", "missing")
    _load_error(tmp_path / "nothing", tree, tmp_path / "nothing", "no checkpoint")
    assert not checkpoint_exists(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_metadata(tmp_path / "nothing")


def test_bad_recorded_dtype(tmp_path):
    d, tree = _saved(tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    meta["dtypes"]["['a']"] = "not-a-dtype"
    (d / "meta.json").write_text(json.dumps(meta))
    _load_error(d, tree, d / "meta.json", "['a']", "not-a-dtype")
    meta["dtypes"]["['a']"] = "float16"  # wrong width for the stored float32 data
    (d / "meta.json").write_text(json.dumps(meta))
    _load_error(d, tree, d / "meta.json", "['a']", "float16")


def test_foreign_checkpoint_names_tensors(tmp_path):
    d, tree = _saved(tmp_path)
    _load_error(d, {"a": jnp.zeros(3), "z": jnp.zeros(2)}, d, "different model or optimizer",
                "missing ['z']", "unexpected ['b']", "original config")
    _load_error(d, {"a": jnp.zeros(4), "b": jnp.zeros(2)}, "['a'] is float32[3], expected float32[4]")
    _load_error(d, {"a": jnp.zeros(3, jnp.int32), "b": jnp.zeros(2)}, "['a'] is float32[3], expected int32[3]")
    many = {f"t{i}": jnp.zeros(1) for i in range(20)}
    msg = _load_error(d, many, "(+16 more)")
    assert len(msg) < 600


def test_interrupted_write_falls_back_to_old(tmp_path):
    d, tree = _saved(tmp_path)
    d.rename(d.with_name("c.old"))  # killed between the two renames of a save
    assert checkpoint_exists(d)
    assert read_metadata(d) == {"step": 5}
    out, meta = load_checkpoint(d, tree)
    assert meta == {"step": 5}
    # the next save replaces it cleanly
    save_checkpoint(d, {"a": jnp.ones(3), "b": jnp.ones(2)}, {"step": 6})
    assert not d.with_name("c.old").exists() and read_metadata(d) == {"step": 6}
    # a stale .old next to a complete checkpoint is ignored and cleaned up by the next save
    shutil.copytree(d, d.with_name("c.old"))
    (d.with_name("c.old") / "meta.json").write_text("{")
    assert read_metadata(d) == {"step": 6}
    save_checkpoint(d, tree, {"step": 7})
    assert read_metadata(d) == {"step": 7} and not d.with_name("c.old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp dirs left behind


def test_cli_reports_a_broken_checkpoint_in_one_line(tmp_path, capsys):
    from eggroll.cli import main

    cfg = {"layers": 1, "width": 8, "population": 2}
    save_checkpoint(tmp_path / "checkpoint", {"params": {"w": jnp.zeros((8, 8), jnp.int8)}}, {"config": cfg})
    with open(tmp_path / "checkpoint" / "arrays.safetensors", "r+b") as f:
        f.truncate(100)
    assert main(["sample", "--checkpoint", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eggroll sample: error: checkpoint file ") and "\n" not in err
    assert str(tmp_path / "checkpoint" / "arrays.safetensors") in err and "truncated" in err
