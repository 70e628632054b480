"""`eggroll bench generate` runs end to end at a tiny size and reports sane numbers (no timing
assertions: every reported quantity exists and is a positive finite number)."""

import json
import math

from eggroll import cli
from eggroll.bench.generate import Config, run


def test_generate_bench_reports_all_numbers(capsys):
    r = run(Config(vocab=64, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=48, members=4,
                   prompts_per_member=2, prompt_len=4, new_tokens=3, reps=1, inner=1, warmup=0, per_row=False))
    json.dumps(r)
    for k in ("noise_over_plain", "noise_over_plain_median", "noise_over_plain_paired"):
        assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, k
    assert set(r["tokens_per_s"]) == {"plain", "noise"} and all(v > 0 for v in r["tokens_per_s"].values())
    assert r["rows"] == 8 and isinstance(r["ok"]["noise_over_plain"], bool)
    assert "generate" in cli.BENCHES


def test_generate_bench_layouts_of_the_fine_tuners():
    """--layout all (vectors with full noise) on an untied model runs; a typo is one clear error."""
    import pytest

    small = dict(vocab=64, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=48, members=4,
                 prompts_per_member=2, prompt_len=4, new_tokens=3, reps=1, inner=1, warmup=0, per_row=False)
    r = run(Config(layout="all", untied=True, **small))
    assert r["noise_over_plain"] > 0 and r["config"]["layout"] == "all"
    with pytest.raises(ValueError, match="unknown parameter group"):
        run(Config(layout="matrix", **small))
