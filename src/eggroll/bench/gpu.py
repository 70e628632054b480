"""`eggroll bench gpu`: the project's one accelerator check, a few time-boxed parts in one command
(<= 11 minutes on one GPU; `--parts` splits it over two calls), each printing its JSON record as it finishes, so a run cut off early
still reports what it measured.

Parts (each in its own process, so one part's memory and compile caches do not reach the next,
and this process never initialises a device itself):

    throughput  forward_over_inference / update / step ratios of `bench throughput` at width 4096,
                N 4096, bfloat16 (the paper: 0.91 with pre-generated noise, 0.69 regenerated)
    egg         EGG generation throughput (`bench egg-throughput`) at population 262,144, width
                256, 6 layers (the paper's model), chunked: member-tokens/s and its GEMM bound
    sampler     the per-member-noise sampler vs plain generation (`bench generate`) at the
                Qwen2-0.5B shape (vocab 151,936, hidden 896, 24 layers, 14 / 2 heads) with
                random weights
    countdown   countdown-mini (`train countdown-mini`), EGGROLL at population 4,096 and GRPO,
                each 25 s of wall clock (`--clock wall`): accuracies and samples per second
    rl          seconds per generation of EGGROLL vs OpenES (`bench rl`) on the paper's six
                named environments at population 2,048, 3 s of training each

A "{tmp}" in a part's arguments becomes a fresh temporary directory (a run directory that must
not reuse an earlier run's results). A part cut off by its time box reports the JSON lines it
printed so far ("partial").

Another issue adds its part as one entry of PARTS (an `eggroll` command line, a time box and the
keys of its result to report). `--tiny` runs every part at toy sizes: the CPU check that the
command works before device time is spent on it.

    eggroll bench gpu                 # on the GPU machine
    eggroll bench gpu --tiny          # on a laptop CPU, in about a minute
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time


@dataclasses.dataclass(frozen=True)
class Part:
    args: tuple  # `eggroll` arguments at full size
    tiny: tuple  # the same at toy sizes (--tiny)
    seconds: int  # time box at full size
    report: tuple  # result keys copied into the part's record


_EGG_PAPER = "--preset paper --population 262144 --chunk 4096 --generations 10"
_QWEN2_05B = ("--vocab", "151936", "--hidden", "896", "--layers", "24", "--heads", "14", "--kv-heads", "2",
              "--intermediate", "4864", "--dtype", "bfloat16")

_RL_SIX = ("Pendulum-v1,brax/inverted_double_pendulum,Craftax-Symbolic-v1,Game2048-v1,kinetix/m/h17_thrustcontrol_left,"
           "Navix-DoorKey-8x8-v0")

PARTS = {
    "throughput": Part(
        ("bench", "throughput", "--width", "4096", "--population", "4096", "--dtype", "bfloat16", "--no-openes",
         "--reps", "10", "--inner", "3", "--reps-t", "3", "--chunk-t", "256"),
        ("bench", "throughput", "--width", "32", "--population", "16", "--layers", "1", "--tokens", "4",
         "--reps", "2", "--inner", "1", "--reps-t", "1", "--warmup", "0", "--no-openes"),
        150, ("forward_over_inference", "update_over_inference", "step_over_inference_t100", "median_ratios",
              "timings_ms", "device", "peak_rss_mib")),
    "egg": Part(
        ("bench", "egg-throughput", "--flags", _EGG_PAPER, "--repeats", "3"),
        ("bench", "egg-throughput", "--flags", "--population 64 --width 16 --layers 1 --tokens-per-update 4 "
         "--max-bytes 200000 --generations 10", "--repeats", "1"),
        150, ("population", "layers", "width", "tokens_per_update", "chunk", "generation_s", "member_bytes_per_s",
              "bound_fraction", "gemm_gop_per_s", "backend")),
    "sampler": Part(
        ("bench", "generate", *_QWEN2_05B, "--members", "128", "--prompts-per-member", "8", "--prompt-len", "64",
         "--new-tokens", "64", "--reps", "3", "--inner", "1"),
        ("bench", "generate", "--vocab", "64", "--hidden", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1",
         "--intermediate", "32", "--members", "4", "--prompts-per-member", "2", "--prompt-len", "4",
         "--new-tokens", "4", "--reps", "1", "--inner", "1", "--warmup", "0"),
        120, ("noise_over_plain", "per_row_over_plain", "timings_ms", "device")),
    "countdown": Part(
        ("train", "countdown-mini", "--population", "4096", "--es-prompts", "16", "--clock", "wall", "--budget-s", "25",
         "--eval-every-s", "5", "--seeds", "0", "--pass-k", "0", "--no-progress", "--run-dir", "{tmp}"),
        ("train", "countdown-mini", "--hidden", "16", "--layers", "1", "--sft-problems", "200", "--eval-problems", "16",
         "--sft-max-steps", "5", "--population", "8", "--es-prompts", "2", "--grpo-prompts", "2", "--group-size", "2",
         "--clock", "wall", "--budget-s", "1", "--eval-every-s", "1", "--seeds", "0", "--pass-k", "0",
         "--no-progress", "--run-dir", "{tmp}"),
        120, ("start_accuracy", "eggroll_accuracy", "grpo_accuracy", "eggroll_samples_per_s", "grpo_samples_per_s",
              "devices")),
    "rl": Part(
        ("bench", "rl", "--envs", _RL_SIX, "--methods", "eggroll,open_es", "--seeds", "1", "--budget-wall-s", "3",
         "--population", "2048", "--eval-every", "1000", "--eval-episodes", "1", "--out-dir", "{tmp}"),
        ("bench", "rl", "--envs", "CartPole-v1,Pendulum-v1", "--methods", "eggroll,open_es", "--seeds", "1",
         "--budget-wall-s", "0.5", "--population", "8", "--hidden", "8", "--eval-every", "1000", "--eval-episodes", "1",
         "--out-dir", "{tmp}"),
        90, ("speed",)),
}


@dataclasses.dataclass
class Config:
    tiny: bool = dataclasses.field(default=False, metadata={"help": "toy sizes (a CPU check of the command)"})
    parts: str = dataclasses.field(default="all", metadata={"help": f"comma-separated parts of {sorted(PARTS)}, or all"})
    time_scale: float = dataclasses.field(default=1.0, metadata={"help": "multiply every part's time box"})
    out: str = dataclasses.field(default="", metadata={"help": "also append each part's record to this JSON-lines file"})


def selected(cfg: Config) -> list[str]:
    names = sorted(PARTS) if cfg.parts == "all" else [p for p in cfg.parts.split(",") if p]
    unknown = [p for p in names if p not in PARTS]
    if unknown or not names:
        raise ValueError(f"--parts: unknown part(s) {unknown or names}; choose from {sorted(PARTS)} or all")
    if not cfg.time_scale > 0:
        raise ValueError(f"--time-scale must be > 0, got {cfg.time_scale}")
    return [p for p in PARTS if p in names]  # PARTS order


def run_part(name: str, cfg: Config) -> dict:
    """One part in its own process, within its time box; its record (never raises for the part)."""
    part = PARTS[name]
    with tempfile.TemporaryDirectory(prefix=f"eggroll-gpu-{name}-") as tmp:
        args = [a.replace("{tmp}", tmp) for a in (part.tiny if cfg.tiny else part.args)]
        return _run_args(name, args, max(1, round(part.seconds * cfg.time_scale * (3 if cfg.tiny else 1))), part.report)


def _run_args(name: str, args: list[str], box: int, report: tuple) -> dict:
    rec: dict = {"part": name, "command": "eggroll " + " ".join(_quote(a) for a in args), "time_box_s": box}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "eggroll.cli", *args], capture_output=True, text=True,
                              timeout=box)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rec.update(ok=False, timed_out=True, wall_s=round(time.perf_counter() - t0, 1),
                   partial=[json.loads(x) for x in out.splitlines() if x.startswith("{")][-20:])
        return rec
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        rec.update(ok=False, error=(proc.stderr.strip().splitlines() or ["(no output)"])[-1][:500])
        return rec
    result = json.loads(lines[-1])
    rec.update(ok=True, result={k: result[k] for k in report if k in result})
    return rec


def _quote(a: str) -> str:
    return f'"{a}"' if " " in a else a


def run(cfg: Config) -> dict:
    records = []
    for name in selected(cfg):
        rec = run_part(name, cfg)
        print(json.dumps(rec), flush=True)
        if cfg.out:
            with open(cfg.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        records.append(rec)
    return {"bench": "gpu", "tiny": cfg.tiny, "parts": {r["part"]: r.get("result") for r in records},
            "failed": [r["part"] for r in records if not r["ok"]],
            "wall_s": round(sum(r["wall_s"] for r in records), 1)}
