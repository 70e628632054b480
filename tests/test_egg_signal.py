"""EGG diagnostics: `eggroll bench egg-signal` (the agreement statistic on synthetic weight
changes, flag-string parsing, a tiny end-to-end run) and `eggroll bench egg-throughput`."""

import numpy as np
import pytest

from eggroll.bench import egg_signal


def test_agreement_statistic():
    rng = np.random.default_rng(0)
    w0 = {"m": np.zeros((64, 64), np.int8), "v": np.zeros(64, np.int8)}
    signal = rng.integers(-3, 4, (64, 64))
    same = {"m": signal.astype(np.int8), "v": np.ones(64, np.int8)}
    noisy = {"m": (signal + rng.integers(-3, 4, (64, 64))).astype(np.int8), "v": rng.integers(-2, 3, 64).astype(np.int8)}
    indep = {"m": rng.integers(-3, 4, (64, 64)).astype(np.int8), "v": rng.integers(-2, 3, 64).astype(np.int8)}
    kinds = {"m": "matrix", "v": "vector"}
    assert egg_signal.agreement(w0, same, same, kinds)["pooled"]["matrices"]["corr"] == 1.0
    agree = egg_signal.agreement(w0, same, noisy, kinds)["pooled"]["matrices"]
    assert 0.5 < agree["corr"] < 0.9 and agree["z"] > 10
    null = egg_signal.agreement(w0, same, indep, kinds)
    assert abs(null["pooled"]["matrices"]["z"]) < 4  # ~N(0, 1) under independence
    assert null["leaves"]["m"]["null_se"] == round(1 / 64, 4)


def test_recipe_flags_are_parsed_and_checked():
    cfg = egg_signal.recipe_config("--momentum-bits 4 --alpha 0.05", noise_seed=3)
    assert (cfg.momentum_bits, cfg.alpha, cfg.noise_seed) == (4, 0.05, 3)
    with pytest.raises(ValueError, match="flags"):
        egg_signal.recipe_config("--no-such-flag 1")
    with pytest.raises(ValueError, match="noise_seeds"):
        egg_signal.run(egg_signal.Config(noise_seeds="5,5"))


def test_tiny_signal_run(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat. a dog ate the hat. " * 3000)
    flags = (f"--dataset {text} --cache-dir {tmp_path / 'cache'} --population 32 --width 16 --group-size 4 "
             "--tokens-per-update 16 --eval-bytes 256 --eval-streams 8 --sigma-shift 3 --alpha 0.3 --alpha-decay 0 "
             "--no-progress")
    out = egg_signal.run(egg_signal.Config(flags=flags, generations=6, out_dir=str(tmp_path / "sig")))
    assert set(out["pooled"]) == {"matrices", "vectors"}
    assert len(out["valid_bits_per_byte"]) == 2 and out["valid_bits_per_byte"][0] != out["valid_bits_per_byte"][1]
    assert 0 < out["moved_per_generation"][0]["moved_frac_matrices"] <= 1
    assert "layers.0.wf" in out["leaves"]


def test_egg_throughput_bench_tiny(tmp_path):
    from eggroll.bench import egg_throughput

    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat. " * 2000)
    out = egg_throughput.run(egg_throughput.Config(
        flags=f"--dataset {text} --cache-dir {tmp_path / 'c'} --population 32 --width 16 --tokens-per-update 8",
        repeats=1))
    assert out["gemm_bound_s"] > 0 and out["chunk"] == 8  # 32 members over the 4 test devices
    assert out["member_bytes_per_s"] == pytest.approx(32 * 8 / out["generation_s"], rel=0.01)  # generation_s is rounded
    assert out["bound_fraction"] == pytest.approx(out["gemm_bound_s"] / out["generation_s"], rel=0.02, abs=1e-3)


def test_auto_chunk():
    from eggroll.recipes.egg import auto_chunk

    assert [auto_chunk(n) for n in (1024, 96, 7, 130)] == [64, 48, 7, 26]
