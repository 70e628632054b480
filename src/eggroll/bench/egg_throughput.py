"""EGG generation throughput: member-bytes per second of one whole training generation (population
forward + integer update) against the int8 GEMM bound, both timed in this process.

    eggroll bench egg-throughput                                   # the default egg recipe
    eggroll bench egg-throughput --flags "--width 256 --layers 6"  # any `eggroll train egg` flags

member-bytes/s = population x tokens_per_update / t(generation). The bound is the time of plain
int8 x int8 -> int32 GEMMs doing the generation's matmul work all at once: for every weight
matrix (m, n) of the model one (population * tokens, n) x (n, m) product (the recurrent U h
products counted as if they could be batched too; the low-rank corrections are not counted), so
bound_fraction = t(GEMMs) / t(generation) <= 1 says how close the step is to its matmuls. The
generation is timed warm (compile excluded), best of `repeats` calls; the last line is JSON.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclass
class Config:
    flags: str = field(default="", metadata={"help": "`eggroll train egg` flags (model, population, chunk...), one string"})
    repeats: int = field(default=10, metadata={"help": "timed generations (the best is reported)"})


def _best(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def gemm_bound_s(params, rows: int, repeats: int) -> float:
    """Time of int8 GEMMs (rows, n) x (n, m), one per weight matrix (m, n) of `params`: the
    fastest of blocks of 4,096 / 16,384 / 65,536 rows (at most all rows; scaled to all rows, so
    the inputs stay small at the paper's 262,144 members x 100 bytes)."""
    return min(_gemm_block_s(params, rows, block, repeats) for block in sorted({min(rows, b) for b in (4096, 16384, 65536)}))


def matmul_weights(params) -> list:
    """The weight matrices the forward multiplies by (the embedding is a lookup, not a matmul)."""
    return [w for path, w in jax.tree_util.tree_flatten_with_path(params)[0]
            if w.ndim == 2 and "embed" not in jax.tree_util.keystr(path)]


def _gemm_block_s(params, rows: int, block: int, repeats: int) -> float:
    mats = matmul_weights(params)
    xs = [jnp.ones((block, w.shape[1]), jnp.int8) for w in mats]
    dims = (((1,), (1,)), ((), ()))
    gemms = jax.jit(lambda xs, ws: [lax.dot_general(x, w, dims, preferred_element_type=jnp.int32)
                                    for x, w in zip(xs, ws)])
    return _best(lambda: gemms(xs, mats), repeats) * rows / block


def run(cfg: Config) -> dict:
    from ..config import config_from_flags
    from ..recipes import egg

    if cfg.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {cfg.repeats}")
    train = egg.build(config_from_flags(egg, cfg.flags, progress=False))
    rc = train.cfg
    state = {"s": train.init()}
    tokens = train.batch(0)

    def generation():
        state["s"], m = train.step(state["s"], tokens)
        return m

    t_gen = _best(generation, cfg.repeats)
    member_bytes = rc.population * rc.tokens_per_update
    t_bound = gemm_bound_s(state["s"].params, member_bytes, cfg.repeats)
    macs = sum(int(np.prod(w.shape)) for w in matmul_weights(state["s"].params))
    return {"bench": "egg_throughput", "population": rc.population, "layers": rc.layers, "width": rc.width,
            "tokens_per_update": rc.tokens_per_update, "chunk": train.spec.chunk,
            "generation_s": round(t_gen, 5), "member_bytes_per_s": round(member_bytes / t_gen),
            "gemm_bound_s": round(t_bound, 5), "bound_fraction": round(t_bound / t_gen, 3),
            "gemm_gop_per_s": round(2 * macs * member_bytes / t_bound / 1e9, 1),
            "config": dataclasses.asdict(cfg), "devices": jax.device_count(), "backend": jax.default_backend()}
