"""`eggroll bench throughput --grid`: the throughput ratios over widths x populations x ranks x
dtypes, one JSON record per point.

Each point runs `eggroll bench throughput` in its own process (so its peak RSS is its own) with
evaluate_population's automatic member chunk (at most 1,024 members): the population work's
memory does not grow with the population (only the inputs do). A point, or its T-input part, is skipped and says why when its estimated memory
exceeds `grid_mem_gib` or one call's estimated matmul work exceeds `grid_max_gflop` (on a 2-core
CPU the widest points would take hours; `grid_max_gflop_t` for the T-input part). Records are appended to `grid_out` as JSON lines and a
rerun skips the points already there (resumable); the last line printed is a summary.

    eggroll bench throughput --grid                                   # the whole grid
    eggroll bench throughput --grid --grid-widths 256,1024 --grid-dtypes float32
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

from ..noise import largest_divisor_at_most
from ..population import default_chunk

TARGET_NOTE = ("targets: forward_over_inference >= 0.90 at width >= 256 (float32; >= 0.95 at width "
               "1024), update_over_inference <= 1.1 at rank 1, step_over_inference_t100 >= 0.90")


def _ints(text: str) -> list:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def _point_key(p: dict) -> tuple:
    return (p["width"], p["population"], p["rank"], p["dtype"])


def grid_points(cfg) -> list[dict]:
    dtypes = [d for d in str(cfg.grid_dtypes).split(",") if d]
    bad = [d for d in dtypes if d not in ("float32", "bfloat16")]
    if bad:
        raise ValueError(f"--grid-dtypes: unknown dtype(s) {bad}; choose from float32, bfloat16")
    return [{"width": w, "population": n, "rank": r, "dtype": d}
            for w, n, r, d in itertools.product(_ints(cfg.grid_widths), _ints(cfg.grid_populations),
                                                _ints(cfg.grid_ranks), dtypes)]


def plan_point(cfg, p: dict) -> dict:
    """Chunk, which parts run, and the reasons for the parts that do not."""
    w, n, r, layers = p["width"], p["population"], p["rank"], cfg.layers
    item = 2 if p["dtype"] == "bfloat16" else 4
    noise_per_member = layers * ((2 * w) * r + w) * 4  # low-rank factors + bias noise (float32)
    chunk = default_chunk(n) or n
    gflop_1 = 2 * n * layers * w * w / 1e9  # one plain inference of N inputs
    params_b = layers * w * w * 4 * 6  # params, grads, Adam moments, donated copies
    mem_1 = n * w * item * 4 + params_b + chunk * noise_per_member * 3
    mem_t = mem_1 + n * cfg.tokens * w * item * 3  # T inputs per member + activations of a batch
    plan = {"chunk": chunk, "chunk_t": min(chunk, largest_divisor_at_most(n, cfg.chunk_t or n)),
            "gflop_per_call": round(gflop_1, 2), "est_mem_gib": round(mem_1 / (1 << 30), 2), "skip": None,
            "skip_t": None}
    plan["skip"] = _over_budget(cfg, mem_1, gflop_1, cfg.grid_max_gflop, "--grid-max-gflop")
    plan["skip_t"] = None if plan["skip"] else _over_budget(cfg, mem_t, gflop_1 * cfg.tokens, cfg.grid_max_gflop_t,
                                                            "--grid-max-gflop-t")
    return plan


def _over_budget(cfg, mem_bytes: float, gflop: float, max_gflop: float, flag: str) -> str | None:
    """Why a part does not fit this machine's grid budget, or None."""
    why = []
    if mem_bytes > cfg.grid_mem_gib * (1 << 30):
        why.append(f"~{mem_bytes / (1 << 30):.1f} GiB > --grid-mem-gib {cfg.grid_mem_gib}")
    if gflop > max_gflop:
        why.append(f"{gflop:.3g} GFLOP per call > {flag} {max_gflop}")
    return "; ".join(why) or None


def _point_flags(cfg, p: dict, plan: dict) -> list[str]:
    flags = ["--width", p["width"], "--population", p["population"], "--rank", p["rank"], "--dtype", p["dtype"],
             "--layers", cfg.layers, "--chunk", plan["chunk"], "--chunk-t", plan["chunk_t"],
             "--tokens", 0 if plan["skip_t"] else cfg.tokens, "--reps", cfg.grid_reps, "--inner", cfg.grid_inner,
             "--reps-t", max(1, cfg.grid_reps // 2), "--warmup", min(cfg.warmup, 2), "--no-openes", "--seed", cfg.seed,
             "--noise-source", cfg.noise_source]
    return [str(f) for f in flags]


def _done(path: str) -> dict:
    out = {}
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    out[_point_key(rec["point"])] = rec
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut off by an interrupted run is measured again
    return out


def _measure(cfg, p: dict, plan: dict) -> dict:
    cmd = [sys.executable, "-m", "eggroll.cli", "bench", "throughput", *_point_flags(cfg, p, plan)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.grid_timeout)
    rec = {"point": p, "plan": plan, "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        rec["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return rec
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    keys = ("forward_over_inference", "update_over_inference", "step_over_inference_t100")
    rec.update({k: round(r[k], 4) for k in keys if k in r})
    rec.update(median_ratios=r.get("median_ratios"), peak_rss_mib=r.get("peak_rss_mib"),
               timings_ms=r.get("timings_ms"))
    return rec


def run_grid(cfg) -> dict:
    points = grid_points(cfg)
    done = _done(cfg.grid_out)
    records = []
    for p in points:
        if _point_key(p) in done:
            records.append(done[_point_key(p)])
            continue
        plan = plan_point(cfg, p)
        if plan["skip"]:
            rec = {"point": p, "plan": plan, "skipped": f"does not fit: {plan['skip']}"}
        else:
            try:
                rec = _measure(cfg, p, plan)
            except subprocess.TimeoutExpired:
                rec = {"point": p, "plan": plan, "skipped": f"timed out after {cfg.grid_timeout} s"}
        print(json.dumps(rec), flush=True)
        if cfg.grid_out:
            with open(cfg.grid_out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        records.append(rec)
    measured = [r for r in records if "forward_over_inference" in r]
    return {"grid": True, "points": len(records), "measured": len(measured),
            "skipped": sum("skipped" in r for r in records), "errors": sum("error" in r for r in records),
            "grid_out": cfg.grid_out, "note": TARGET_NOTE,
            "table": [[*_point_key(r["point"]), r.get("forward_over_inference"), r.get("update_over_inference"),
                       r.get("step_over_inference_t100"), r.get("peak_rss_mib")] for r in measured]}
