"""EGG population study: held-out bits/byte and peak memory as the population grows, at a fixed
number of generations and a fixed chunk size.

    eggroll bench egg-population                                # 64, 512, 4096 members + a reuse point
    eggroll bench egg-population --populations 64,256,1024,4096 --generations 100
    eggroll bench egg-population --flags "--momentum-bits 4"    # any `eggroll train egg` flags

A point PxG (e.g. 4096x512) is population P with group_size G: each data stream is shared by G
members, so the run reads G/2 times fewer training bytes than with antithetic pairs alone (the
paper's data-reuse study).

Each population is trained by `eggroll train egg` (same flags otherwise) in a fresh Python
process, so its peak resident set size (ru_maxrss of that process) is its own. With the chunk
size fixed the population forward holds `chunk` members' activations at a time; what grows with
the population is only O(N) data: fitness vector, per-member hidden states (N x layers x width
bytes) and the stream windows. The last line is one JSON object with a row per population.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

_CHILD = (
    "import json, resource, sys\n"
    "from eggroll.recipes import egg as R\n"
    "r = R.run(R.Config(**json.loads(sys.argv[1])))\n"
    "r['peak_rss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
    "print(json.dumps(r))\n"
)


def _arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    populations: str = _arg("64,512,4096,4096x512", "comma-separated populations; PxG = population P, group_size G")
    generations: int = _arg(150, "generations per run (fixed across populations)")
    chunk: int = _arg(64, "members per vmap chunk (fixed: memory should stay flat)")
    flags: str = _arg("", "extra `eggroll train egg` flags for every run, one string")
    out_dir: str = _arg("runs/egg-population", "one run directory per population under this")


def populations(spec: str) -> list[tuple[int, int]]:
    """'64,4096x512' -> [(64, 0), (4096, 512)] (group size 0: the recipe's own)."""
    out = []
    try:
        for item in spec.replace(" ", "").split(","):
            if item:
                p, _, g = item.partition("x")
                out.append((int(p), int(g) if g else 0))
    except ValueError:
        raise ValueError(f"populations must be comma-separated integers or PxG, got {spec!r}") from None
    if not out or any(p < 2 or p % 2 or g % 2 or (g and p % g) for p, g in out):
        raise ValueError(f"populations must be even integers >= 2 (PxG: G even and dividing P), got {spec!r}")
    return out


def run(cfg: Config) -> dict:
    from ..config import config_from_flags
    from ..recipes import egg

    points = populations(cfg.populations)
    for p, _ in points:
        if p % cfg.chunk and p > cfg.chunk:
            raise ValueError(f"chunk {cfg.chunk} must divide every population (got {p})")
    rows = []
    for p, g in points:
        fixed = {"population": p, "generations": cfg.generations, "chunk": min(cfg.chunk, p),
                 "eval_every": cfg.generations, "checkpoint_every": 0, "progress": False, "resume": False,
                 "run_dir": str(Path(cfg.out_dir) / (f"pop{p}" + (f"x{g}" if g else "")))}
        run_cfg = config_from_flags(egg, cfg.flags, **fixed, **({"group_size": g} if g else {}))
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(dataclasses.asdict(run_cfg))],
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"population {p} failed:\n{proc.stderr[-2000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        row = {"population": p, "group_size": run_cfg.group_size, "valid_bits_per_byte": res["valid_bits_per_byte"],
               "peak_rss_mib": round(res["peak_rss_mib"], 1), "wall_s": res["wall_s"],
               "train_bytes": res["train_bytes"]}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    first = rows[0]
    return {"bench": "egg_population", "generations": cfg.generations, "chunk": cfg.chunk,
            "bigram_valid_bits_per_byte": res["bigram_valid_bits_per_byte"],
            "unigram_valid_bits_per_byte": res["unigram_valid_bits_per_byte"],
            "rows": rows, "config": dataclasses.asdict(cfg),
            "rss_ratio_largest_vs_smallest": round(max(r["peak_rss_mib"] for r in rows) / first["peak_rss_mib"], 3)}
