"""Float minGRU backprop baseline (baselines/backprop.py, recipes/egg_backprop.py)."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from eggroll import cli, distributed
from eggroll.baselines import backprop as bp
from eggroll.population import device_sum
from eggroll.checkpoint import load_checkpoint
from eggroll.recipes import egg_backprop as eb
from eggroll.runlog import read_metrics

FORWARD = jax.jit(bp.forward)


def _np_params(params):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


def _reference_forward(params, inputs, h0):
    """The model written out per byte in float64 numpy, straight from the formulas."""
    p = _np_params(params)
    sig = lambda z: 1 / (1 + np.exp(-z))
    norm = lambda x, w: w * x / (np.abs(x).mean() + bp.EPS)
    h = [np.array(x, np.float64) for x in np.asarray(h0)]
    logits = []
    for byte in inputs:
        x = p["embed"][byte]
        for i, lp in enumerate(p["layers"]):
            if byte == 0:
                h[i] = np.zeros_like(h[i])
            a = norm(x, lp["norm1"])
            f = sig(a @ lp["w_f"] + h[i] @ lp["u_f"] + lp["b_f"])
            cand = np.tanh(a @ lp["w_h"] + (f * h[i]) @ lp["u_h"] + lp["b_h"])
            h[i] = h[i] + f * (cand - h[i])
            x = x + h[i]
            x = x + (norm(x, lp["norm2"]) @ lp["mlp_in"]) @ lp["mlp_out"]
        logits.append(norm(x, p["out_norm"]) @ p["head"])
    return np.stack(logits), np.stack(h)


@pytest.fixture(scope="module")
def tiny():
    params = bp.init_params(jax.random.PRNGKey(0), 2, 8)
    # non-trivial biases and norm weights, so the test sees them
    k = jax.random.split(jax.random.PRNGKey(1), 8)
    for i, lp in enumerate(params["layers"]):
        lp["b_f"] = jax.random.normal(k[2 * i], (8,))
        lp["norm2"] = 1 + 0.3 * jax.random.normal(k[2 * i + 1], (8,))
    return params


def test_forward_matches_per_byte_reference(tiny):
    inputs = np.array([[65, 66, 0, 67, 68, 68, 0, 0, 70, 71],
                       [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], np.uint8)
    h0 = jax.random.normal(jax.random.PRNGKey(2), (2, 2, 8))  # [layers, batch, width]
    logits, h = FORWARD(tiny, h0, inputs)
    for b in range(2):
        ref_logits, ref_h = _reference_forward(tiny, inputs[b], h0[:, b])
        np.testing.assert_allclose(np.asarray(logits[b]), ref_logits, rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(np.asarray(h[:, b]), ref_h, rtol=2e-4, atol=2e-4)


def test_reset_at_separator_forgets_the_past(tiny):
    a = np.array([[5, 6, 7, 0, 9, 9]], np.uint8)
    b = np.array([[200, 1, 30, 0, 9, 9]], np.uint8)
    h0 = bp.init_state(2, 1, 8)
    la, _ = FORWARD(tiny, h0, a)
    lb, _ = FORWARD(tiny, h0, b)
    assert not np.allclose(la[0, :3], lb[0, :3])
    np.testing.assert_allclose(la[0, 3:], lb[0, 3:], rtol=1e-6, atol=1e-6)


def test_windows_with_carried_state_equal_one_long_window(tiny):
    x = np.random.default_rng(0).integers(0, 256, (3, 12)).astype(np.uint8)
    h0 = bp.init_state(2, 3, 8)
    full, h_full = FORWARD(tiny, h0, x)
    l1, h1 = FORWARD(tiny, h0, x[:, :5])
    l2, h2 = FORWARD(tiny, h1, x[:, 5:])
    np.testing.assert_allclose(np.concatenate([l1, l2], axis=1), full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h2, h_full, rtol=1e-5, atol=1e-5)


def test_eval_layout_covers_every_byte_once():
    for n, streams, t in [(100, 7, 8), (5, 16, 4), (64, 4, 16)]:
        index, mask = bp.eval_layout(n, streams, t)
        assert index.shape[1] % t == 0
        assert sorted(index[mask].tolist()) == list(range(n))
        for row, m in zip(index, mask):  # each stream is contiguous
            assert np.all(np.diff(row[m]) == 1)


def test_evaluate_matches_brute_force(tiny):
    data = np.random.default_rng(1).integers(0, 256, 37).astype(np.uint8)
    data[[5, 20]] = 0
    got = bp.make_evaluate(2, 8, 4, 3)(tiny, data)
    total = 0.0
    for idx, m in zip(*bp.eval_layout(len(data), 3, 4)):
        stream = data[idx[m]]
        logits, _ = _reference_forward(tiny, np.concatenate([[0], stream[:-1]]), np.zeros((2, 8)))
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total += -logp[np.arange(len(stream)), stream].sum() / math.log(2)
    assert got == pytest.approx(total / len(data), rel=1e-4)


def test_loss_is_next_byte_cross_entropy_in_bits(tiny):
    window = np.array([[3, 4, 5, 0, 7]], np.uint8)
    loss, _ = bp.loss_fn(tiny, bp.init_state(2, 1, 8), window)
    logits, _ = _reference_forward(tiny, window[0, :-1], np.zeros((2, 8)))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -logp[np.arange(4), window[0, 1:]].mean() / math.log(2)
    assert float(loss) == pytest.approx(want, rel=1e-4)


def test_window_bits_matches_brute_force(tiny):
    w = np.random.default_rng(3).integers(0, 256, (2, 7)).astype(np.uint8)
    total = 0.0
    for row in w:
        logits, _ = _reference_forward(tiny, row[:-1], np.zeros((2, 8)))
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total += -logp[np.arange(6), row[1:]].sum() / math.log(2)
    assert float(bp.window_bits(tiny, w)) == pytest.approx(total / 12, rel=1e-4)


def test_data_parallel_step_matches_one_device():
    """streams split over the 4 devices (conftest): the same step up to float summation order,
    with one all-reduce of the gradients (none inside the backward scan) and one all-gather of h."""
    from eggroll import distributed as dist
    from eggroll.population import population_mesh

    cfg = eb.Config(layers=2, width=8, streams=8, seq_len=6, generations=10)
    state = eb.init_state(cfg)
    h = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8))
    window = np.random.default_rng(4).integers(0, 256, (8, 7)).astype(np.uint8)
    one = bp.make_train_step(eb.make_optimizer(cfg))(state.params, state.opt_state, h, window)
    mesh = population_mesh()
    split = bp.make_train_step(eb.make_optimizer(cfg), mesh=mesh)
    args = (*dist.replicate((state.params, state.opt_state, h)), eb.split_streams(window, mesh))
    many = split(*args)
    for x, y in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(many)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert many[2].sharding.is_fully_replicated
    hlo = split.lower(*args).compile().as_text()
    sums = [ln for ln in hlo.splitlines() if " collective-permute(" in ln or " all-reduce(" in ln]
    assert len(sums) == 2 and not any("while" in ln for ln in sums), sums  # log2(4) exchanges, outside the scan
    n_params = sum(np.size(x) for x in jax.tree_util.tree_leaves(state.params))
    comm = dist.communication(split, *args, n_params=n_params)
    assert comm["comm_by_kind"]["collective-permute"] == 2 * 4 * (n_params + 1)  # f32 gradient + loss, twice


def test_device_sum_is_one_fixed_order():
    """device_sum on 4 devices (recursive doubling) and on 3 (ordered all-gather): the sums
    (x0 + x1) + (x2 + x3) and (x0 + x1) + x2 exactly, on every device."""
    from jax.sharding import Mesh, PartitionSpec as P

    x = np.float32([1e8, 1.0, -1e8, 3.0, 0.5, 7.0]).reshape(-1, 1) * np.float32([1, 1e-3])
    for n, want in ((4, (x[0] + x[1]) + (x[2] + x[3])), (3, (x[0] + x[1]) + x[2])):
        mesh = Mesh(np.asarray(jax.devices()[:n]), ("d",))
        f = jax.jit(jax.shard_map(lambda a: device_sum(a[0], "d", n)[None], mesh=mesh, in_specs=P("d"),
                                  out_specs=P("d"), check_vma=False))
        got = np.asarray(f(x[:n]))
        assert (got == want[None]).all(), (n, got, want)


# --- the recipe -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    words = ["the", "cat", "sat", "on", "the", "mat", "and", "the", "dog", "ate", "the", "log"]
    rng = np.random.default_rng(0)
    for i in range(30):
        (d / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 120)))
    return d


def _cfg(corpus_dir, tmp_path, **kw):
    base = {"dataset": str(corpus_dir), "cache_dir": str(tmp_path.parent / "cache"), "layers": 1, "width": 16,
                "streams": 4, "seq_len": 16, "generations": 60, "lr": 1e-2, "warmup": 5, "eval_every": 20, "eval_bytes": 256,
                "eval_streams": 4, "checkpoint_every": 0, "progress": False, "run_dir": str(tmp_path / "run")}
    return eb.Config(**{**base, **kw})


def test_learns_below_unigram(corpus_dir, tmp_path):
    result = eb.run(_cfg(corpus_dir, tmp_path))
    assert result["steps"] == result["generations"] == 60 and result["bytes_seen"] == 60 * 4 * 16
    assert result["devices"] == 4  # tests/conftest.py: the 4 streams are split over 4 devices
    first = read_metrics(tmp_path / "run")[0]
    assert first["valid_prefix_bits_per_byte"] > 7  # untrained: about uniform over 256 bytes
    assert result["valid_bits_per_byte"] < result["unigram_valid_bits_per_byte"], result
    assert result["egg_eval_bits_per_byte"] < result["unigram_egg_eval_bits_per_byte"], result
    for name in ("metrics.jsonl", "curve.png", "config.json", "result.json", "checkpoint/meta.json"):
        assert (tmp_path / "run" / name).exists(), name
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == json.loads(json.dumps(result))


def test_resume_is_exact(corpus_dir, tmp_path, monkeypatch):
    # same shapes and schedule as test_learns_below_unigram: the jitted functions are reused
    straight = eb.run(_cfg(corpus_dir, tmp_path / "a"))
    cfg = _cfg(corpus_dir, tmp_path / "b", checkpoint_every=30)
    assert _train_until(cfg, 30, monkeypatch) == 30  # interrupted right after the step-30 checkpoint
    resumed = eb.run(dataclasses.replace(cfg, resume=True))
    for key in ("valid_bits_per_byte", "train_bits_per_byte", "egg_eval_bits_per_byte", "valid_prefix_bits_per_byte"):
        assert resumed[key] == straight[key], key
    a = load_checkpoint(tmp_path / "a" / "run" / "checkpoint", eb.init_state(cfg))[0]
    b = load_checkpoint(tmp_path / "b" / "run" / "checkpoint", eb.init_state(cfg))[0]
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    steps = [r["generation"] for r in read_metrics(tmp_path / "b" / "run") if "train_bits_per_byte" in r]
    assert steps == list(range(1, 61))


def _train_until(cfg, stop, monkeypatch):
    """Run `cfg` but interrupt it (KeyboardInterrupt) right after step `stop` is checkpointed."""
    real = distributed.save_checkpoint

    def save_then_stop(directory, tree, metadata, **kw):
        real(directory, tree, metadata, **kw)
        if metadata["generation"] == stop:
            raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(distributed, "save_checkpoint", save_then_stop)
        try:
            eb.run(cfg)
        except KeyboardInterrupt:
            return stop
    return None


def test_resume_refuses_a_different_config(corpus_dir, tmp_path):
    eb.run(_cfg(corpus_dir, tmp_path, eval_every=60))
    with pytest.raises(ValueError, match="width"):
        eb.run(_cfg(corpus_dir, tmp_path, eval_every=60, width=8, resume=True))


def test_config_errors(tmp_path):
    for bad in ({"width": 0}, {"generations": -1}, {"lr": float("nan")}, {"mlp_activation": "tanh"},
                {"max_bytes": 2}, {"eval_every": 0}, {"streams": 6}):  # streams: 4 devices (conftest)
        with pytest.raises(ValueError, match="egg-backprop config"):
            eb.run(eb.Config(run_dir=str(tmp_path), **bad))


def test_cli(corpus_dir, tmp_path, capsys):
    argv = ["train", "egg-backprop", "--dataset", str(corpus_dir), "--cache-dir", str(tmp_path / "cache"),
            "--layers", "1", "--width", "16", "--streams", "4", "--seq-len", "16", "--generations", "60",
            "--lr", "0.01", "--warmup", "5", "--eval-every", "60", "--eval-streams", "4", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("valid_bits_per_byte", "bigram_valid_bits_per_byte", "unigram_valid_bits_per_byte", "wall_s"):
        assert isinstance(out[key], float), key
    assert cli.main([*argv[:3], "nosuch-dataset", *argv[4:]]) == 2
    assert "unknown dataset" in capsys.readouterr().err
