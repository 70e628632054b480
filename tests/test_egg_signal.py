"""`eggroll bench egg-signal`: the agreement statistic on synthetic weight changes, the flag
string parsing, and a tiny end-to-end run."""

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
