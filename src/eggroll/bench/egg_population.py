"""EGG population study: held-out bits/byte and peak memory as the population grows, at a fixed
number of generations and a fixed chunk size.

    eggroll bench egg-population                                # 64, 512, 4096 members
    eggroll bench egg-population --populations 64,256,1024,4096 --generations 100

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
    populations: str = _arg("64,512,4096", "comma-separated population sizes")
    generations: int = _arg(150, "generations per run (fixed across populations)")
    chunk: int = _arg(64, "members per vmap chunk (fixed: memory should stay flat)")
    layers: int = _arg(1, "layers")
    width: int = _arg(64, "width")
    tokens_per_update: int = _arg(64, "bytes per stream per generation")
    group_size: int = _arg(2, "members per data stream")
    alpha: float = _arg(1.0, "z-test level at generation 0")
    alpha_decay: float = _arg(6.0, "alpha decay (bits over the run)")
    sigma_shift: int = _arg(4, "sigma = 2^-sigma_shift")
    fitness: str = _arg("norm", "pair fitness (sign | norm)")
    dataset: str = _arg("stdlib", "corpus")
    seed: int = _arg(0, "seed")
    out_dir: str = _arg("runs/egg-population", "one run directory per population under this")


def populations(spec: str) -> list[int]:
    try:
        out = [int(p) for p in spec.replace(" ", "").split(",") if p]
    except ValueError:
        raise ValueError(f"populations must be comma-separated integers, got {spec!r}") from None
    if not out or any(p < 2 or p % 2 for p in out):
        raise ValueError(f"populations must be even integers >= 2, got {spec!r}")
    return out


def run(cfg: Config) -> dict:
    pops = populations(cfg.populations)
    for p in pops:
        if p % cfg.chunk and p > cfg.chunk:
            raise ValueError(f"chunk {cfg.chunk} must divide every population (got {p})")
    rows = []
    for p in pops:
        run_cfg = {"population": p, "generations": cfg.generations, "chunk": min(cfg.chunk, p),
                   "layers": cfg.layers, "width": cfg.width, "tokens_per_update": cfg.tokens_per_update,
                   "group_size": cfg.group_size, "alpha": cfg.alpha, "alpha_decay": cfg.alpha_decay,
                   "sigma_shift": cfg.sigma_shift, "fitness": cfg.fitness, "dataset": cfg.dataset, "seed": cfg.seed,
                   "eval_every": cfg.generations, "checkpoint_every": 0, "progress": False,
                   "run_dir": str(Path(cfg.out_dir) / f"pop{p}")}
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(run_cfg)],
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"population {p} failed:\n{proc.stderr[-2000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        row = {"population": p, "valid_bits_per_byte": res["valid_bits_per_byte"],
               "peak_rss_mib": round(res["peak_rss_mib"], 1), "wall_s": res["wall_s"],
               "train_bytes": res["train_bytes"]}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    first = rows[0]
    return {"bench": "egg_population", "generations": cfg.generations, "chunk": cfg.chunk,
            "bigram_eval_bits_per_byte": res["bigram_eval_bits_per_byte"],
            "unigram_eval_bits_per_byte": res["unigram_eval_bits_per_byte"],
            "rows": rows, "config": dataclasses.asdict(cfg),
            "rss_ratio_largest_vs_smallest": round(rows[-1]["peak_rss_mib"] / first["peak_rss_mib"], 3)}
