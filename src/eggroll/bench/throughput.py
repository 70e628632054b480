"""Throughput of EGGROLL on an MLP: population forward, ES update and whole generation against
plain batched inference of the same network, and against a full-rank OpenES generation.

All in one process. Every quantity is a jitted function followed by block_until_ready; the
first call (compile) and `warmup` more are not timed. Quantities that are compared are timed in
rounds, interleaved (rotating order), so a change in machine load hits all of them alike; in a
round each runs one untimed call and then `inner` timed calls (so each is timed warm, as in a
loop that repeats it). The headline inference ratios are ratios of 10th-percentile times (the
fast calls); `median_ratios` and `paired_ratios` (median over rounds of the per-round ratio) are
cross-checks. On a small shared CPU the spread can be large: plain inference's GEMMs now and
then run at half speed (the runtime's thread pool), which inflates its median and would flatter
EGGROLL (see `quantiles_ms`: p10, p50, p90), so the p10 ratio is the conservative figure.

    forward_over_inference    t(plain inference, N inputs) / t(population forward: member i
                              runs its own perturbed MLP on its one input; es.noise is called
                              inside the jitted function, so the noise is regenerated each
                              generation). Higher is better; 1.0 means the noise is free.
    update_over_inference     t(es.tell on a fitness vector) / t(plain inference, N inputs).
                              Lower is better; ~1.0 is the floor for rank 1 (a GEMM of the same
                              FLOPs), antithetic pairs halve it.
    step_over_inference_t100  t(plain inference, N*T inputs) / t(generation: population forward
                              with T inputs per member + tell + optax step). Higher is better.
    step_over_openes          t(OpenES generation) / t(the same EGGROLL generation), one input
                              per member, same MLP, N and noise source. Higher is better.

Fairness notes. Both sides of the T-input comparison compute the same per-member fitness
(mean squared output), so neither writes N*T*width outputs; plain inference is timed both as
one batch and in the generation's member chunks, and the faster is the baseline. Population
work goes through `evaluate_population` on one device (chunked for T inputs and for OpenES:
`chunk_t`, `openes_chunk`; OpenES gets the chunk that suits it). The generations donate their
(params, opt_state, es_state) carry as a training loop would: without donation every call that
returns the ES state; the noise context (table) is a separate, never-returned argument.

    eggroll bench throughput --width 1024 --population 256
    eggroll bench throughput --grid      # widths x populations x ranks x dtypes (throughput_grid.py)

`--tokens 0` leaves out the T-input timing (step_over_inference_t100). `peak_rss_mib` is this
process's peak resident memory.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ..models.mlp import init_mlp, mlp
from ..noise import largest_divisor_at_most
from ..population import evaluate_population
from ..strategy import eggroll, open_es

TARGETS = {
    "forward_over_inference": (">=", 0.95),
    "update_over_inference": ("<=", 1.1),
    "step_over_inference_t100": (">=", 0.90),
    "step_over_openes": (">=", 500.0),
}


@dataclasses.dataclass
class Config:
    width: int = dataclasses.field(default=1024, metadata={"help": "size of every square layer matrix"})
    layers: int = dataclasses.field(default=3, metadata={"help": "number of width x width layers (tanh between)"})
    population: int = dataclasses.field(default=256, metadata={"help": "population size N"})
    rank: int = dataclasses.field(default=1, metadata={"help": "EGGROLL noise rank r"})
    tokens: int = dataclasses.field(default=100, metadata={"help": "inputs per member T in the step_over_inference timing"})
    dtype: str = dataclasses.field(default="float32", metadata={"help": "params / activations dtype",
                                                                "choices": ("float32", "bfloat16")})
    sigma: float = dataclasses.field(default=0.01, metadata={"help": "noise scale"})
    antithetic: bool = dataclasses.field(default=True, metadata={"help": "antithetic (mirrored) pairs"})
    noise_source: str = dataclasses.field(default="table", metadata={"help": "source of normals (both strategies)",
                                                                     "choices": ("table", "threefry")})
    table_size: int = dataclasses.field(default=0, metadata={"help": "noise table entries (0 = library default)"})
    chunk: int = dataclasses.field(default=0, metadata={
        "help": "members per vmap chunk in the one-input forward / generation (0 = evaluate_population's automatic chunk)"})
    chunk_t: int = dataclasses.field(default=32, metadata={
        "help": "members per vmap chunk in the T-input generation (0 = automatic; 32 suits both "
                "jax 0.6 and 0.10 on CPU, 16 is fastest on 0.10, 64 on 0.6)"})
    openes_chunk: int = dataclasses.field(default=32, metadata={
        "help": "members per vmap chunk in the OpenES generation (0 = automatic)"})
    reps: int = dataclasses.field(default=30, metadata={"help": "timed rounds for the one-input timings (median)"})
    inner: int = dataclasses.field(default=5, metadata={
        "help": "timed calls per unit and round in the one-input groups (after one untimed call)"})
    reps_t: int = dataclasses.field(default=10, metadata={"help": "timed rounds for the T-input timings (median)"})
    warmup: int = dataclasses.field(default=3, metadata={"help": "untimed calls of each function after compiling"})
    openes: bool = dataclasses.field(default=True, metadata={"help": "time a full-rank OpenES generation too"})
    openes_reps: int = dataclasses.field(default=5, metadata={"help": "timed rounds for the (slow) OpenES comparison"})
    openes_threefry: bool = dataclasses.field(default=False, metadata={
        "help": "also compare both strategies with noise_source='threefry' (slow: ~10 s per OpenES call)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "random seed"})
    grid: bool = dataclasses.field(default=False, metadata={
        "help": "run the grid of points below (one process and one JSON line each) instead of one point"})
    grid_widths: str = dataclasses.field(default="256,1024,4096", metadata={"help": "grid: widths"})
    grid_populations: str = dataclasses.field(default="256,4096,32768", metadata={"help": "grid: populations"})
    grid_ranks: str = dataclasses.field(default="1,4", metadata={"help": "grid: ranks"})
    grid_dtypes: str = dataclasses.field(default="float32,bfloat16", metadata={"help": "grid: dtypes"})
    grid_mem_gib: float = dataclasses.field(default=8.0, metadata={"help": "grid: skip points estimated above this"})
    grid_reps: int = dataclasses.field(default=6, metadata={"help": "grid: --reps of each point (--reps-t: half)"})
    grid_inner: int = dataclasses.field(default=2, metadata={"help": "grid: --inner of each point"})
    grid_max_gflop: float = dataclasses.field(default=100.0, metadata={
        "help": "grid: skip a point whose one-input call does more matmul GFLOP than this"})
    grid_max_gflop_t: float = dataclasses.field(default=200.0, metadata={
        "help": "grid: skip a point's T-input part when its one call does more matmul GFLOP than this"})
    grid_timeout: int = dataclasses.field(default=1800, metadata={"help": "grid: seconds per point"})
    grid_out: str = dataclasses.field(default="throughput_grid.jsonl", metadata={
        "help": "grid: JSON-lines file of the records (points already in it are not rerun)"})


def _block(tree):
    return jax.tree_util.tree_map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def _call(fn: Callable, *args) -> Callable[[], Any]:
    """A timed unit: call fn(*args); returns the (not yet ready) result."""
    return lambda: fn(*args)


def _step(fn: Callable, carry: tuple, *args) -> Callable[[], Any]:
    """A timed unit for a training step carry -> carry (donated): threads the carry."""
    state = {"carry": carry}

    def run():
        state["carry"] = fn(*state["carry"], *args)
        return state["carry"]

    return run


def _interleaved(units: dict[str, Callable], reps: int, warmup: int, inner: int = 1) -> dict[str, dict]:
    """Compile + warm up each unit, then time `reps` rounds. In a round every unit runs in turn
    (rotating the order): one untimed call (if inner > 1, so no unit is timed with its data
    evicted by the previous unit), then `inner` timed calls, each blocked on. Returns per unit
    the median / min ms over all timed calls, the per-round medians and the first-call time."""
    first = {}
    for name, run in units.items():
        t0 = time.perf_counter()
        _block(run())
        first[name] = time.perf_counter() - t0
        for _ in range(max(0, warmup)):
            _block(run())
    names = list(units)
    samples = {name: [] for name in names}
    rounds = {name: [] for name in names}
    for i in range(max(1, reps)):
        for name in names[i % len(names):] + names[: i % len(names)]:
            if inner > 1:
                _block(units[name]())
            ts = []
            for _ in range(max(1, inner)):
                t0 = time.perf_counter()
                _block(units[name]())
                ts.append((time.perf_counter() - t0) * 1e3)
            samples[name] += ts
            rounds[name].append(statistics.median(ts))
    return {name: {"median_ms": statistics.median(s), "min_ms": min(s), "samples": rounds[name],
                   "quantiles_ms": _deciles(s), "first_call_s": first[name]} for name, s in samples.items()}


def _deciles(s: list) -> list:
    """[p10, p50, p90] of the samples."""
    if len(s) < 2:
        return [s[0]] * 3
    q = statistics.quantiles(s, n=10, method="inclusive")
    return [q[0], statistics.median(s), q[-1]]


def _paired(num: list, den: list) -> float:
    """Median over rounds of num / den (same round = same machine conditions)."""
    return statistics.median(a / b for a, b in zip(num, den))


def _fitness(y):
    return -jnp.mean(jnp.square(y.astype(jnp.float32)))


def _ONE_DEVICE():
    """Everything runs on the first device, like the plain inference it is compared with."""
    return jax.local_devices()[:1]


def _divisor_chunk(n: int, chunk: int):
    """`chunk` lowered to a divisor of n (0: None, evaluate_population's automatic chunk)."""
    if not chunk:
        return None
    return largest_divisor_at_most(n, chunk)


def _population_forward(es, n: int, chunk):
    """Member m evaluates its perturbed MLP on x[m]; the noise is drawn inside the jit."""

    def forward(params, ctx, state, x):
        return evaluate_population(lambda m: mlp(params, x[m], es.noise(ctx, state, m)), n, chunk=chunk,
                                   devices=_ONE_DEVICE())

    return jax.jit(forward)


def _plain_fitness(n: int, chunk):
    """Plain inference of x (N, T, in) as one batch of N*T rows (chunk None) or member chunks,
    reduced to the per-member fitness like the generation."""

    def batch(params, x):
        m, t = x.shape[:2]
        y = mlp(params, x.reshape(m * t, x.shape[-1])).reshape(m, t, -1)
        return jax.vmap(_fitness)(y)

    if chunk is None:
        return jax.jit(batch)
    return jax.jit(lambda params, x: lax.map(lambda xc: batch(params, xc),
                                             x.reshape(n // chunk, chunk, *x.shape[1:])).reshape(n))


def _generation(es, opt, n: int, chunk):
    """One ES generation: population fitness (evaluate_population), es.tell, optax step."""

    def generation(params, opt_state, state, ctx, x):
        f = evaluate_population(lambda m: _fitness(mlp(params, x[m], es.noise(ctx, state, m))), n, chunk=chunk,
                                devices=_ONE_DEVICE())
        grads, state, _ = es.tell(ctx, state, f)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state

    return jax.jit(generation, donate_argnums=(0, 1, 2))


def _copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def _ok(name, value):
    op, target = TARGETS[name]
    return bool(value >= target) if op == ">=" else bool(value <= target)


def _ratios(timings: dict):
    """(p10 ratios, median ratios, paired ratios, plain-inference baseline name) of the timings."""
    ms = {k: v["median_ms"] for k, v in timings.items()}
    s = {k: v["samples"] for k, v in timings.items()}
    # the faster plain-inference variant is the baseline
    base_nt = min(("inference_nt", "inference_nt_chunked"), key=lambda k: ms.get(k, float("inf")))
    lo = {k: v["quantiles_ms"][0] for k, v in timings.items()}  # 10th percentiles
    median_ratios = {"forward_over_inference": ms["inference_n"] / ms["population_forward"],
                     "update_over_inference": ms["update"] / ms["inference_n"]}
    paired = {"forward_over_inference": _paired(s["inference_n"], s["population_forward"]),
              "update_over_inference": _paired(s["update"], s["inference_n"])}
    p10_ratios = {"forward_over_inference": lo["inference_n"] / lo["population_forward"],
                  "update_over_inference": lo["update"] / lo["inference_n"]}
    if "generation_t" in ms:  # the T-input part ran
        median_ratios["step_over_inference_t100"] = ms[base_nt] / ms["generation_t"]
        paired["step_over_inference_t100"] = _paired(s[base_nt], s["generation_t"])
        p10_ratios["step_over_inference_t100"] = (min(lo["inference_nt"], lo.get("inference_nt_chunked", float("inf")))
                                                  / lo["generation_t"])
    # Headline: ratios of the fast (10th-percentile) calls. On a shared CPU the medians of the
    # plain-inference baseline are inflated by slow GEMM calls, which flatters EGGROLL; the p10
    # ratios are the conservative, repeatable figure. Medians are reported beside them.
    return p10_ratios, median_ratios, paired, base_nt


def _openes_ratios(cfg, n, params, opt, opt_state, k_es, x1, chunk, gen1, ctx_state, timings, ms, result):
    """Full-rank OpenES generations against EGGROLL's (step_over_openes[_threefry] in result)."""
    ctx, state = ctx_state
    table_size = cfg.table_size or None
    # OpenES calls take hundreds of ms and allocate GBs; interleaving them with the ~10 ms
    # EGGROLL generation inflates the latter, so the ratio divides by generation_1 from the
    # one-input group (the interleaved EGGROLL timing is reported too)
    sources = [cfg.noise_source] + (["threefry"] if cfg.openes_threefry and cfg.noise_source != "threefry" else [])
    for src in sources:
        sfx = "" if src == cfg.noise_source else f"_{src}"
        oes = open_es(n, cfg.sigma, antithetic=cfg.antithetic, noise_source=src, table_size=table_size)
        octx = oes.setup(k_es, params)
        ogen = _generation(oes, opt, n, _divisor_chunk(n, cfg.openes_chunk))
        units = {f"openes_generation_1{sfx}": _step(ogen, _copy((params, opt_state, oes.init(octx))), octx, x1)}
        if sfx:  # EGGROLL with this noise source, timed on its own like generation_1
            ees = eggroll(n, cfg.sigma, cfg.rank, antithetic=cfg.antithetic, noise_source=src,
                          table_size=table_size)
            ectx = ees.setup(k_es, params)
            cmp = _interleaved({f"eggroll_generation_1{sfx}": _step(
                _generation(ees, opt, n, chunk), _copy((params, opt_state, ees.init(ectx))), ectx, x1)},
                cfg.reps, cfg.warmup, inner=cfg.inner)
            timings.update(cmp)
            ms.update({k: v["median_ms"] for k, v in cmp.items()})
        else:
            units["eggroll_generation_1_interleaved"] = _step(gen1, _copy((params, opt_state, state)), ctx, x1)
        cmp = _interleaved(units, cfg.openes_reps, min(cfg.warmup, 1))
        del octx
        timings.update(cmp)
        ms.update({k: v["median_ms"] for k, v in cmp.items()})
        den = "generation_1" if not sfx else f"eggroll_generation_1{sfx}"
        result[f"step_over_openes{sfx}"] = ms[f"openes_generation_1{sfx}"] / ms[den]


def _describe(result, cfg, timings, ms, paired, median_ratios, notes) -> dict:
    """Targets met, all ratio variants, raw timings, config and host facts into `result`."""
    result["ok"] = {k: _ok(k, v) for k, v in result.items() if k in TARGETS}
    result["all_ok"] = all(result["ok"].values())
    result["targets"] = {k: f"{op} {v}" for k, (op, v) in TARGETS.items()}
    result["paired_ratios"] = {k: round(v, 4) for k, v in paired.items()}
    result["median_ratios"] = {k: round(v, 4) for k, v in median_ratios.items()}
    result["notes"] = notes
    result["timings_ms"] = {k: round(v, 4) for k, v in ms.items()}
    result["timings_min_ms"] = {k: round(v["min_ms"], 4) for k, v in timings.items()}
    result["quantiles_ms"] = {k: [round(q, 4) for q in v["quantiles_ms"]] for k, v in timings.items()}
    result["first_call_s"] = {k: round(v["first_call_s"], 3) for k, v in timings.items()}
    result["config"] = dataclasses.asdict(cfg)
    dev = jax.devices()[0]
    result["jax_version"] = jax.__version__
    result["device"] = f"{dev.platform}:{getattr(dev, 'device_kind', '')}"
    result["n_devices"] = jax.device_count()
    result["host"] = {"machine": platform.machine(), "cpus": _cpu_count()}
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def run(cfg: Config) -> dict:
    if cfg.grid:
        from .throughput_grid import run_grid

        return run_grid(cfg)
    if cfg.population < 2 or (cfg.antithetic and cfg.population % 2):
        raise ValueError(f"population must be >= 2 (and even with antithetic pairs), got {cfg.population}")
    dtype = jnp.dtype(cfg.dtype)
    n, d, t = cfg.population, cfg.width, cfg.tokens
    key = jax.random.PRNGKey(cfg.seed)
    k_par, k_x, k_xt, k_f, k_es = jax.random.split(key, 5)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), init_mlp(k_par, (d,) * (cfg.layers + 1)))
    x1 = jax.random.normal(k_x, (n, d), jnp.float32).astype(dtype)  # one input per member
    xt = jax.random.normal(k_xt, (n, t, d), jnp.float32).astype(dtype) if t > 0 else None  # T per member
    fitness = jax.random.normal(k_f, (n,), jnp.float32)
    table_size = cfg.table_size or None

    es = eggroll(n, cfg.sigma, cfg.rank, antithetic=cfg.antithetic, noise_source=cfg.noise_source,
                 table_size=table_size)
    ctx = es.setup(k_es, params)
    state = es.init(ctx)
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)

    chunk, chunk_t = _divisor_chunk(n, cfg.chunk), _divisor_chunk(n, cfg.chunk_t)
    infer = jax.jit(lambda p, x: mlp(p, x))
    forward = _population_forward(es, n, chunk)
    update = jax.jit(lambda c, st, f: es.tell(c, st, f)[0])
    gen1 = _generation(es, opt, n, chunk)
    gen_t = _generation(es, opt, n, chunk_t)

    # the compared one-input quantities in one group; the generation (which streams the optimiser
    # state and the whole table through the caches) in its own
    fast = _interleaved({
        "inference_n": _call(infer, params, x1),
        "population_forward": _call(forward, params, ctx, state, x1),
        "update": _call(update, ctx, state, fitness),
    }, cfg.reps, cfg.warmup, inner=cfg.inner)
    fast.update(_interleaved({"generation_1": _step(gen1, _copy((params, opt_state, state)), ctx, x1)},
                             cfg.reps, cfg.warmup, inner=cfg.inner))
    timings = dict(fast)
    if t > 0:
        slow_units = {"inference_nt": _call(_plain_fitness(n, None), params, xt)}
        if chunk_t is not None:
            slow_units["inference_nt_chunked"] = _call(_plain_fitness(n, chunk_t), params, xt)
        slow_units["generation_t"] = _step(gen_t, _copy((params, opt_state, state)), ctx, xt)
        timings.update(_interleaved(slow_units, cfg.reps_t, min(cfg.warmup, 1)))
    ms = {k: v["median_ms"] for k, v in timings.items()}
    p10_ratios, median_ratios, paired, base_nt = _ratios(timings)
    result: dict[str, Any] = dict(p10_ratios)
    notes = {"step_over_inference_t100_baseline": base_nt,
             "headline": "forward/update/step_t100 ratios use 10th-percentile times; see median_ratios"}
    if cfg.openes:
        _openes_ratios(cfg, n, params, opt, opt_state, k_es, x1, chunk, gen1, (ctx, state), timings, ms, result)
    return _describe(result, cfg, timings, ms, paired, median_ratios, notes)


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count()
