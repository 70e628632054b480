"""The throughput benchmark runs end to end at a tiny size and reports sane numbers (no timing
assertions: only that every reported quantity exists and is a positive finite number)."""

import json
import math

from eggroll import cli
from eggroll.bench.throughput import TARGETS, Config, run

TINY = dict(width=64, population=8, tokens=4, reps=1, reps_t=1, inner=1, warmup=1, openes_reps=1)


def _positive_finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_throughput_bench_reports_all_numbers():
    r = run(Config(**TINY))
    json.dumps(r)  # the CLI prints it as one JSON line
    for key in TARGETS:
        assert _positive_finite(r[key]), (key, r[key])
        assert isinstance(r["ok"][key], bool)
        assert _positive_finite(r["paired_ratios"].get(key, 1.0))
        assert _positive_finite(r["median_ratios"].get(key, 1.0))
    for name in ("inference_n", "population_forward", "update", "generation_1", "inference_nt",
                 "generation_t", "openes_generation_1"):
        assert _positive_finite(r["timings_ms"][name]), name
        assert _positive_finite(r["timings_min_ms"][name]), name
        p10, p50, p90 = r["quantiles_ms"][name]
        assert 0 < p10 <= p50 <= p90
    assert r["config"]["width"] == 64 and r["jax_version"] and r["device"]


def test_throughput_bench_options_and_cli_flags():
    # chunked, bf16, no antithetic pairs, no OpenES: still runs; chunk sizes that do not divide N
    r = run(Config(**{**TINY, "population": 6, "antithetic": False, "dtype": "bfloat16",
                      "chunk": 4, "chunk_t": 4, "openes": False}))
    assert "step_over_openes" not in r and _positive_finite(r["forward_over_inference"])
    # the dataclass fields become CLI flags
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_dataclass_flags(parser, Config)
    ns = parser.parse_args(["--width", "32", "--dtype", "bfloat16", "--no-openes", "--chunk-t", "8"])
    cfg = cli.parse_into(Config, ns)
    assert cfg.width == 32 and cfg.dtype == "bfloat16" and cfg.openes is False and cfg.chunk_t == 8
