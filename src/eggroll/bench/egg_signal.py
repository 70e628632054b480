"""EGG signal diagnostic: do two runs that differ only in their noise seed move the weights the
same way? If the integer updates carry signal, the accumulated changes ΔW = W_G - W_0 of two
such runs (same initial weights, same bytes, independent perturbations) are positively
correlated; if they are a ±1 random walk, the correlation is ~N(0, 1/n) over n entries.

    eggroll bench egg-signal                                  # default recipe, 150 generations
    eggroll bench egg-signal --flags "--momentum-bits 4 --alpha 0.05 --alpha-decay 0"

Reports, per leaf and pooled over matrices / vectors: the Pearson correlation of the two runs'
ΔW, its null standard error 1/sqrt(n) and the ratio (a z-score), the fraction of entries each
run moved at all, and the mean fraction moved per generation (from metrics.jsonl). Both runs are
`eggroll train egg` runs (in this process) in out_dir/noise-A and out_dir/noise-B. The last line
is one JSON object.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Config:
    flags: str = field(default="", metadata={"help": "extra `eggroll train egg` flags for both runs, one string"})
    generations: int = field(default=150, metadata={"help": "generations per run"})
    noise_seeds: str = field(default="1000,1001", metadata={"help": "the two noise seeds (comma-separated)"})
    out_dir: str = field(default="runs/egg-signal", metadata={"help": "the two run directories go under this"})


def recipe_config(flags: str, **fixed):
    """An egg recipe Config from a string of `eggroll train egg` flags (config.config_from_flags)."""
    from ..config import config_from_flags
    from ..recipes import egg

    return config_from_flags(egg, flags, **fixed)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def agreement(w0: dict, wa: dict, wb: dict, kinds: dict) -> dict:
    """Per-leaf and pooled correlation of ΔW between two runs; kinds: name -> 'matrix' / 'vector'."""
    rows, pooled = {}, {"matrices": ([], []), "vectors": ([], [])}
    for name in w0:
        da = wa[name].astype(np.int32) - w0[name].astype(np.int32)
        db = wb[name].astype(np.int32) - w0[name].astype(np.int32)
        c, n = correlation(da, db), da.size
        rows[name] = {"corr": round(c, 4), "null_se": round(1 / np.sqrt(n), 4), "z": round(c * np.sqrt(n), 2),
                      "moved_a": round(float(np.mean(da != 0)), 4), "moved_b": round(float(np.mean(db != 0)), 4)}
        group = pooled["matrices" if kinds[name] == "matrix" else "vectors"]
        group[0].append(da.ravel())
        group[1].append(db.ravel())
    out = {}
    for k, (xs, ys) in pooled.items():
        if xs:
            a, b = np.concatenate(xs), np.concatenate(ys)
            c = correlation(a, b)
            out[k] = {"corr": round(c, 4), "null_se": round(1 / np.sqrt(a.size), 4), "z": round(c * np.sqrt(a.size), 2)}
    return {"pooled": out, "leaves": rows}


def run(cfg: Config) -> dict:
    from ..checkpoint import load_checkpoint
    from ..recipes import egg
    from ..runlog import read_metrics

    try:
        seeds = [int(s) for s in cfg.noise_seeds.split(",")]
    except ValueError:
        seeds = []
    if len(seeds) != 2 or seeds[0] == seeds[1] or min(seeds) < 0:
        raise ValueError(f"noise_seeds must be two different seeds >= 0, got {cfg.noise_seeds!r}")
    if cfg.generations < 1:
        raise ValueError(f"generations must be >= 1, got {cfg.generations}")
    import jax

    finals, moved, results = [], [], []
    for tag, seed in zip("AB", seeds):
        run_cfg = recipe_config(cfg.flags, noise_seed=seed, generations=cfg.generations, resume=False,
                                checkpoint_every=0, run_dir=str(Path(cfg.out_dir) / f"noise-{tag}"))
        results.append(egg.run(run_cfg))
        train = egg.build(run_cfg)
        tree, _ = load_checkpoint(Path(run_cfg.run_dir) / "checkpoint", train.init())
        finals.append(dict(zip(train.leaf_names, map(np.asarray, jax.tree_util.tree_leaves(tree.params)))))
        recs = read_metrics(run_cfg.run_dir)
        moved.append({k: float(np.mean([r[k] for r in recs if k in r])) for k in ("moved_frac_matrices", "moved_frac_vectors")})
        print(json.dumps({"run": tag, "noise_seed": seed, "valid_bits_per_byte": results[-1]["valid_bits_per_byte"]}),
              file=sys.stderr)
    w0 = dict(zip(train.leaf_names, map(np.asarray, jax.tree_util.tree_leaves(train.init().params))))
    kinds = {n: ("matrix" if x.ndim == 2 else "vector") for n, x in w0.items()}
    out = agreement(w0, finals[0], finals[1], kinds)
    return {"bench": "egg_signal", "generations": cfg.generations, "flags": cfg.flags, "noise_seeds": seeds,
            "valid_bits_per_byte": [r["valid_bits_per_byte"] for r in results],
            "moved_per_generation": moved, **out}
