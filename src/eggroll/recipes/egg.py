"""EGG: pretrain an integer-only (int8) minGRU byte-level language model with integer EGGROLL.

    eggroll train egg                              # stdlib corpus, CPU-sized defaults
    eggroll train egg --preset paper               # the paper's recipe (6 x 256, ...)
    eggroll train egg --resume                     # continue runs/egg exactly

One generation is one jax.jit call, integer arithmetic only (its metrics are integers too):
population / group_size streams read tokens_per_update training bytes each (antithetic pairs
share a stream); member m reads its stream with its own integer low-rank perturbation from its
hidden state at the end of the previous generation (`models.egg.window_logprob`); fitness = sum
of log2 p in 1/16-bit units; integer EGGROLL (`int8_strategy.int8_eggroll`: its `tell`) turns the fitnesses into ±1 steps that pass
a z-test at level alpha (schedule `level`), optionally on an integer momentum of the statistic.

Every eval_every generations the plain model reads eval_bytes held-out bytes (eval_streams
streams, `tasks.heldout`); at the end it reads final_eval_bytes (default: the whole valid
split). Unigram / bigram baselines are scored on exactly the same byte pairs. Per-leaf fractions
of moved entries are logged every generation (the signal diagnostic is `eggroll bench
egg-signal`). The run directory holds metrics.jsonl, curve.png, config.json, result.json and
checkpoint/; data, noise and thresholds are functions of (seed, generation): --resume is exact.
See docs/EGG.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import distributed, harness
from .. import int8 as i8
from .. import int8_strategy as ist
from .. import noise as nz
from ..models import egg
from ..population import evaluate_population
from ..config import flag

TRAJECTORY_FIELDS = ("population", "layers", "width", "mlp_mult", "residual_init", "gru_shift", "rank", "sigma_shift",
                     "vector_sigma_shift", "alpha", "alpha_decay", "alpha_schedule", "vector_alpha", "update_stat",
                     "momentum_bits", "fitness", "tokens_per_update", "group_size", "dataset", "max_bytes", "seed",
                     "noise_seed", "generations", "noise_reuse", "table_size")


_arg = flag  # Config field -> CLI flag (eggroll.config.flag)


@dataclass
class Config(harness.RunConfig):
    preset: str = _arg("", "start from a named recipe (paper: the paper's; round1: the first CPU defaults); "
                       "explicit flags override it", ("", "paper", "round1"))
    population: int = _arg(4096, "population size (a multiple of group_size and of the device count)")
    layers: int = _arg(1, "number of GRU+MLP layers")
    width: int = _arg(64, "model width d (MLP hidden 4d)")
    residual_init: str = _arg("zero", "MLP output weights: normal (round(16 N(0,1))) or zero", egg.RESIDUAL_INITS)
    mlp_mult: int = _arg(0, "MLP hidden width = mlp_mult x width (0: GRU layers without MLP blocks)")
    gru_shift: str = _arg("joint", "GRU rescaling: joint (W u + U h shifted once) or split (each by its fan-in)",
                          egg.GRU_SHIFTS)
    rank: int = _arg(1, "rank r of the integer low-rank perturbations")
    sigma_shift: int = _arg(4, "noise scale sigma = 2^-sigma_shift")
    vector_sigma_shift: int = _arg(6, "noise scale of vectors (biases, gains): 2^-shift (-1: sigma_shift)")
    alpha: float = _arg(1.0, "z-test level of the update at generation 0 (1: every nonzero Z moves)")
    alpha_decay: float = _arg(4.5, "alpha falls to alpha * 2^-alpha_decay by the last generation (0: constant)")
    alpha_schedule: str = _arg("hyperbolic", "shape of the alpha decay: exp or hyperbolic", ist.ALPHA_SCHEDULES)
    vector_alpha: float = _arg(0.1, "z-test level of vectors at generation 0, same decay (0: alpha)")
    update_stat: str = _arg("ab", "update statistic: ab (sum f A B^T) or sign (sum f sign(A) sign(B)^T)",
                            ist.STATISTICS)
    momentum_bits: int = _arg(0, "integer momentum M = (1 - 2^-k) M + Z tested instead of Z (0: none)")
    fitness: str = _arg("norm", "pair fitness: sign(f+ - f-) or the normalised difference", ist.FITNESS_MODES)
    tokens_per_update: int = _arg(16, "bytes each stream reads per generation")
    group_size: int = _arg(2, "members sharing one data stream (even: antithetic pairs share data)")
    dataset: str = _arg("stdlib", "corpus: stdlib, a text/JSONL file or directory, minipile, a HF dataset")
    cache_dir: str = _arg("", "corpus cache directory (empty: the default)")
    max_bytes: int = _arg(0, "cap on the corpus size in bytes (0: none)")
    seed: int = _arg(0, "random seed (initial weights; also the noise unless noise_seed is set)")
    noise_seed: int = _arg(-1, "seed of the perturbations alone (-1: from seed)")
    generations: int = _arg(15000, "generation budget")
    chunk: int = _arg(0, "members per vmap chunk on each device (0: automatic, at most 64; results do not depend on it)")
    noise_reuse: int = _arg(1, "refresh the noise every k generations (0: never)")
    table_size: int = _arg(0, "int8 noise table entries (0: automatic)")
    eval_every: int = _arg(250, "evaluate held-out bits/byte every k generations")
    eval_bytes: int = _arg(65536, "held-out bytes read by each periodic evaluation")
    final_eval_bytes: int = _arg(0, "held-out bytes read by the final evaluation (0: the whole valid split)")
    eval_streams: int = _arg(64, "parallel held-out streams per evaluation")
    run_dir: str = _arg("runs/egg", "run directory")
    checkpoint_every: int = _arg(500, "checkpoint every k generations (0: only at the end)")


# The paper's recipe (official nano-egg defaults, as we read the paper): 6 x 256, 100 bytes per
# update, one shift for W u + U h, alpha decaying exponentially, no momentum, A B^T statistic.
PRESETS = {
    "paper": {"layers": 6, "width": 256, "mlp_mult": 4, "tokens_per_update": 100, "group_size": 2, "sigma_shift": 4,
              "population": 1024,
              "gru_shift": "joint", "residual_init": "normal", "alpha": 1.0, "alpha_decay": 6.0,
              "alpha_schedule": "exp", "update_stat": "ab", "momentum_bits": 0, "vector_sigma_shift": -1,
              "vector_alpha": 0.0, "fitness": "norm", "noise_reuse": 1},
    # the defaults of round 1 (commit 9811af4), the base of the lever study in docs/RESULTS.md
    "round1": {"population": 1024, "layers": 1, "width": 64, "mlp_mult": 4, "tokens_per_update": 64,
               "residual_init": "normal", "alpha_decay": 6.0, "alpha_schedule": "exp", "vector_sigma_shift": -1,
               "vector_alpha": 0.0, "generations": 1500, "eval_every": 100, "checkpoint_every": 100},
}


def resolve(cfg: Config) -> Config:
    """Apply cfg.preset to a Config built in Python: its values replace the fields left at their
    defaults. (The command line applies presets itself, so that explicit flags always win.)"""
    if not cfg.preset:
        return cfg
    if cfg.preset not in PRESETS:
        raise ValueError(f"egg config: preset must be one of {sorted(PRESETS)} (or empty), got {cfg.preset!r}")
    defaults = Config()
    values = {k: v for k, v in PRESETS[cfg.preset].items() if getattr(cfg, k) == getattr(defaults, k)}
    return dataclasses.replace(cfg, preset="", **values)


def validate(cfg: Config) -> Config:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"egg config: {msg}")

    for name, choices in (("residual_init", egg.RESIDUAL_INITS), ("gru_shift", egg.GRU_SHIFTS),
                          ("alpha_schedule", ist.ALPHA_SCHEDULES), ("update_stat", ist.STATISTICS),
                          ("fitness", ist.FITNESS_MODES)):
        need(getattr(cfg, name) in choices, f"{name} must be one of {choices}, got {getattr(cfg, name)!r}")
    need(cfg.layers >= 1 and cfg.width >= 1 and cfg.mlp_mult >= 0,
         f"layers and width must be >= 1 and mlp_mult >= 0, got {cfg.layers}, {cfg.width}, {cfg.mlp_mult}")
    need(cfg.group_size >= 2 and cfg.group_size % 2 == 0,
         f"group_size must be even and >= 2 (antithetic pairs share data), got {cfg.group_size}")
    need(cfg.population >= 2 and cfg.population % cfg.group_size == 0,
         f"population {cfg.population} must be a positive multiple of group_size {cfg.group_size}")
    harness.check_run_config(cfg)
    harness.check_population(cfg.population, cfg.chunk)  # every device of every process
    need(1 <= cfg.rank <= cfg.width, f"rank must be in [1, width={cfg.width}], got {cfg.rank}")
    need(0 <= cfg.sigma_shift <= 12, f"sigma_shift must be in [0, 12], got {cfg.sigma_shift}")
    need(0 < cfg.alpha <= 1, f"alpha must be in (0, 1], got {cfg.alpha}")
    need(cfg.alpha_decay >= 0, f"alpha_decay must be >= 0, got {cfg.alpha_decay}")
    need(cfg.tokens_per_update >= 1, f"tokens_per_update must be >= 1, got {cfg.tokens_per_update}")
    # |fitness| <= tokens * 24 bits * 16 per member; the update's sum f^2 r must stay < 2^23
    need(cfg.population // 2 * ist.NORM_FITNESS_MAX ** 2 * cfg.rank < (1 << 23),
         f"population x rank too large for the int32 z-test ({cfg.population} x {cfg.rank})")
    need(cfg.eval_streams >= 1 and cfg.eval_bytes >= 1 and cfg.final_eval_bytes >= 0,
         "eval_streams >= 1, eval_bytes >= 1 and final_eval_bytes >= 0 required")
    need(0 <= cfg.vector_alpha <= 1, f"vector_alpha must be in [0, 1] (0: alpha), got {cfg.vector_alpha}")
    need(cfg.vector_sigma_shift == -1 or 0 <= cfg.vector_sigma_shift <= 12,
         f"vector_sigma_shift must be -1 (same as sigma_shift) or in [0, 12], got {cfg.vector_sigma_shift}")
    need(0 <= cfg.momentum_bits <= 12, f"momentum_bits must be in [0, 12], got {cfg.momentum_bits}")
    need(cfg.noise_reuse >= 0 and cfg.table_size >= 0 and cfg.max_bytes >= 0,
         "noise_reuse, table_size and max_bytes must be >= 0")
    return cfg


class TrainState(NamedTuple):
    params: Any  # dict of int8 arrays
    hidden: jax.Array  # (population, layers, width) int8: each member's state, carried on
    es_state: Any  # int8_strategy.IntESState: generation counter (+ integer momentum)


class StepSpec(NamedTuple):
    """The static settings of one generation (hashable: the compiled step is shared by every
    make_train in a process with the same spec and noise plan)."""

    population: int
    group_size: int
    chunk: int
    arch: egg.Arch
    noise: Callable  # es.noise / es.tell of an int8_eggroll: hashable, equal for equal settings
    tell: Callable


def generation(spec: StepSpec, ts: TrainState, tokens, ctx):
    """One generation, integer only: (state, tokens (streams, T + 1) uint8, noise context)
    -> (state, integer metrics)."""
    def member(m):
        noise = spec.noise(ctx, ts.es_state, m)
        h, s, _ = egg.window_logprob(ts.params, ts.hidden[m], tokens[m // spec.group_size], noise, spec.arch)
        return s, h

    fit, hidden = evaluate_population(member, spec.population, chunk=spec.chunk or None)
    steps, es_state, m = spec.tell(ctx, ts.es_state, fit)
    metrics = {"fitness_sum": jnp.sum(fit), "fitness_max": jnp.max(fit), **m}
    return TrainState(i8.apply_steps(ts.params, steps), hidden, es_state), metrics


_generation_jit = jax.jit(generation, static_argnums=0, donate_argnums=1)
_heldout_bits = jax.jit(egg.heldout_bits, static_argnums=2)


class Parts(NamedTuple):
    """The pieces of a run (benches and tests use them directly; `make_train` hands them to the harness)."""

    cfg: Config
    splits: Any  # tasks.text.ByteSplits
    es: Any  # the int8_eggroll strategy
    ctx: nz.NoiseContext  # its noise context: int8 table, plan, threshold schedule (constant)
    init: Callable[[], TrainState]
    batch: Callable[[int], np.ndarray]  # generation -> (streams, T + 1) uint8
    step: Callable  # (TrainState, tokens) -> (TrainState, int metrics)
    spec: StepSpec
    evaluate: Callable  # (params, windows) -> held-out bits/byte (float)
    eval_windows: np.ndarray  # (eval_streams, n_windows, T + 1) uint8, periodic evaluation
    leaf_names: list  # tree_leaves order, for the per-leaf metrics
    leaf_sizes: list


def auto_chunk(local: int, most: int = 64) -> int:
    """The largest divisor of the per-device population <= most (64 members: their activations
    stay in cache; measured fastest on a 2-core CPU, docs/RESULTS.md)."""
    return nz.largest_divisor_at_most(local, most)


def level(cfg: Config, alpha: float, gen: int) -> float:
    return ist.alpha_at(alpha, cfg.alpha_decay, gen, cfg.generations, cfg.alpha_schedule)


def make_strategy(cfg: Config):
    """The integer EGGROLL strategy of a (resolved) config; its z-test levels follow `level`."""
    vector_shift = cfg.sigma_shift if cfg.vector_sigma_shift < 0 else cfg.vector_sigma_shift
    return ist.int8_eggroll(
        cfg.population, 2.0 ** -cfg.sigma_shift, cfg.rank, vector_sigma=2.0 ** -vector_shift,
        alpha=lambda g: level(cfg, cfg.alpha, g), vector_alpha=lambda g: level(cfg, cfg.vector_alpha or cfg.alpha, g),
        generations=cfg.generations, fitness=cfg.fitness, stat=cfg.update_stat, momentum_bits=cfg.momentum_bits,
        noise_reuse=cfg.noise_reuse, table_size=cfg.table_size or None)


def build(cfg: Config, splits=None) -> Parts:
    """The pieces of a run. `splits` (tasks.text.ByteSplits) overrides loading cfg.dataset.
    Every array is replicated over every device of every process (`distributed.replicate`)."""
    cfg = validate(resolve(cfg))
    from ..tasks.heldout import heldout_windows
    from ..tasks.text import load_corpus, stream_windows

    if splits is None:  # process 0 converts the corpus into the cache first; the others then read it
        splits = distributed.main_first(
            lambda: load_corpus(cfg.dataset, cfg.cache_dir or None, max_bytes=cfg.max_bytes or None))
    if len(splits.train) < 2 or len(splits.valid) < 2:
        raise ValueError("the corpus needs at least 2 bytes in train and valid")
    k_params, k_noise = jax.random.split(jax.random.PRNGKey(cfg.seed))
    if cfg.noise_seed >= 0:
        k_noise = jax.random.fold_in(jax.random.PRNGKey(cfg.noise_seed), 0x5EED)
    params0 = egg.init_egg(k_params, cfg.layers, cfg.width, cfg.residual_init, cfg.mlp_mult)
    n_streams = cfg.population // cfg.group_size
    es = make_strategy(cfg)
    place = distributed.replicate
    ctx = place(es.setup(k_noise, params0))
    spec = StepSpec(cfg.population, cfg.group_size, cfg.chunk or auto_chunk(cfg.population // jax.device_count()),
                    egg.Arch(cfg.gru_shift), es.noise, es.tell)

    def step(ts, tokens):
        return _generation_jit(spec, place(ts), place(jnp.asarray(tokens)), ctx)

    def evaluate(params, windows):
        bits = _heldout_bits(place(params), place(jnp.asarray(windows)), spec.arch)
        return float(bits) / windows[..., 1:].size

    def batch(gen):
        return stream_windows(splits.train, n_streams, cfg.tokens_per_update, gen, overlap=1)

    def init():
        hidden = jnp.zeros((cfg.population, cfg.layers, cfg.width), jnp.int8)
        return place(TrainState(params0, hidden, es.init(ctx)))

    flat = jax.tree_util.tree_flatten_with_path(params0)[0]
    names = [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in flat]
    eval_windows = heldout_windows(np.asarray(splits.valid), cfg.eval_bytes, cfg.eval_streams)
    return Parts(cfg, splits, es, ctx, init, batch, step, spec, evaluate, eval_windows,
                 names, [int(np.size(x)) for _, x in flat])


def baselines(splits, windows) -> dict:
    """Unigram / bigram bits per byte (add-one, fit on train) on exactly the byte pairs the
    model scores when it reads `windows`."""
    from ..tasks.heldout import ngram_bits_on_windows

    return ngram_bits_on_windows(splits.train, windows)


def leaf_metrics(train: Parts, moved_leaves) -> dict:
    """Fractions of entries moved this generation: per leaf, and pooled over matrices / vectors."""
    out, pooled = {}, {"matrices": [0, 0], "vectors": [0, 0]}
    for name, size, leaf, m in zip(train.leaf_names, train.leaf_sizes, train.ctx.plan.leaves, moved_leaves):
        if leaf.kind == nz.FROZEN:
            continue
        out[f"moved_frac/{name}"] = int(m) / size
        group = pooled["matrices" if leaf.kind == nz.LOWRANK else "vectors"]
        group[0] += int(m)
        group[1] += size
    out.update({f"moved_frac_{k}": v[0] / max(v[1], 1) for k, v in pooled.items()})
    return out


def make_train(cfg: Config, splits=None) -> harness.Train:
    """The run for the harness: one generation per step, held-out bits/byte (and the n-gram
    baselines on the same bytes) as the evaluation, the whole valid split in the summary."""
    parts = build(cfg, splits)
    cfg = parts.cfg
    base = baselines(parts.splits, parts.eval_windows)
    lines = {"bigram_valid": base["bigram"], "unigram_valid": base["unigram"]}
    n_tok = cfg.population // cfg.group_size * cfg.tokens_per_update

    def step(state, gen):
        state, m = parts.step(state, parts.batch(gen))
        m = jax.device_get(m)
        return state, {"train_bits_per_byte": -float(m["fitness_sum"]) / (16 * cfg.population * cfg.tokens_per_update),
                       "moved": int(m["moved"]), "pairs_nonzero": int(m["pairs_nonzero"]),
                       "alpha": level(cfg, cfg.alpha, gen), "train_bytes": (gen + 1) * n_tok,
                       **leaf_metrics(parts, m["moved_leaves"])}

    def evaluate(state, gen):
        return {"valid_bits_per_byte": parts.evaluate(state.params, parts.eval_windows), **lines}

    def communication(state):  # measured from the compiled generation: fitness + carried hidden states
        place = distributed.replicate
        n_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(state.params))
        return distributed.communication(_generation_jit, parts.spec, place(state), place(jnp.asarray(parts.batch(0))),
                                         parts.ctx, n_params=n_params)

    return harness.Train(
        name="egg", init=parts.init, step=step, evaluate=evaluate, trajectory=TRAJECTORY_FIELDS,
        title=f"EGG int8 L{cfg.layers} d{cfg.width}, population {cfg.population}",
        plot_keys=[("valid_bits_per_byte", "train_bits_per_byte", "bigram_valid", "unigram_valid"),
                   ("moved_frac_matrices", "moved_frac_vectors")],
        postfix_keys=["valid_bits_per_byte", "train_bits_per_byte"],
        summary=lambda state, result: final_result(cfg, parts, state, result, base), communication=communication,
        # with a constant alpha the budget does not change the trajectory: a resume may extend it
        canonical=lambda k, v: None if k == "generations" and cfg.alpha_decay == 0 else v)


def run(cfg: Config, splits=None) -> dict:
    """Train with the harness (logging, checkpoints, --resume); returns the final summary dict."""
    cfg = validate(resolve(cfg))
    return harness.run(cfg, lambda c: make_train(c, splits))


def final_result(cfg: Config, parts: Parts, state: TrainState, result: dict, base: dict) -> dict:
    """The summary: the final model on final_eval_bytes of valid (0: all of it) beside the
    n-gram baselines on exactly those bytes, and the periodic figure on eval_bytes."""
    from ..tasks.heldout import heldout_windows

    final_windows = heldout_windows(np.asarray(parts.splits.valid), cfg.final_eval_bytes, cfg.eval_streams)
    final_base = baselines(parts.splits, final_windows)
    final = parts.evaluate(state.params, final_windows)
    return {
        "valid_bits_per_byte": final,
        "bigram_valid_bits_per_byte": final_base["bigram"],
        "unigram_valid_bits_per_byte": final_base["unigram"],
        "valid_bytes": final_base["bytes"],
        "beats_bigram": bool(final < final_base["bigram"]),
        "eval_bits_per_byte": result["valid_bits_per_byte"], "bigram_eval_bits_per_byte": base["bigram"],
        "unigram_eval_bits_per_byte": base["unigram"], "eval_bytes": base["bytes"],
        "population": cfg.population,
        "train_bytes": result["generations"] * cfg.population // cfg.group_size * cfg.tokens_per_update,
    }
