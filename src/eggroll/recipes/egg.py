"""EGG: pretrain an integer-only (int8) minGRU byte-level language model with integer EGGROLL.

    eggroll train egg                              # stdlib corpus, CPU-sized defaults (~10 min)
    eggroll train egg --population 1024 --width 128 --layers 2
    eggroll train egg --resume                     # continue runs/egg exactly

One generation is one jax.jit call, integer arithmetic only (its metrics are integers too):

  1. Data. population / group_size parallel streams read the training split
     (`tasks.text.stream_windows`); each generation every stream advances tokens_per_update bytes.
     Stream s is shared by members s*group_size ... (s+1)*group_size - 1, so antithetic pairs
     always see the same bytes (group_size is even).
  2. Population. Member m reads its stream with its own integer low-rank perturbation,
     starting from its hidden state at the end of the previous generation (carried across
     generations; reset at document separators); fitness = sum of log2 p in 1/16-bit units.
  3. Update. int8_strategy.es_step: per-pair fitness (sign or normalised difference), Z =
     sum_p f_p A_p B_p^T in int32, ±1 steps where |Z| passes a z-test at level alpha
     (alpha * 2^(-alpha_decay * g / G): constant for alpha_decay 0).

Every eval_every generations the unperturbed model reads eval_streams windows of eval_tokens
held-out bytes from a zero state; the exact cross-entropy of its integer logits (float, a
metric) is `valid_bits_per_byte`. The unigram / bigram baselines (fit on train) are reported on
the whole validation split and on exactly the evaluated bytes. The run directory holds
metrics.jsonl, curve.png (baselines as horizontal lines), config.json, result.json and
checkpoint/ (params, per-member hidden states; generation and wall clock in its metadata).
Data, noise and thresholds are functions of (seed, generation), so --resume is exact.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import int8 as i8
from .. import int8_strategy as ist
from .. import noise as nz
from ..checkpoint import load_checkpoint, save_checkpoint, config_mismatch
from ..models import egg
from ..population import evaluate_population
from ..runlog import RunLog
from ..cli import flag

TRAJECTORY_FIELDS = ("population", "layers", "width", "residual_init", "rank", "sigma_shift", "alpha", "alpha_decay",
                     "fitness", "tokens_per_update", "group_size", "dataset", "max_bytes", "seed",
                     "generations", "noise_reuse", "table_size")


_arg = flag  # Config field -> CLI flag (eggroll.cli.flag)


@dataclass
class Config:
    population: int = _arg(1024, "population size (a multiple of group_size and of the device count)")
    layers: int = _arg(1, "number of GRU+MLP layers")
    width: int = _arg(64, "model width d (MLP hidden 4d)")
    residual_init: str = _arg("normal", "MLP output weights: normal (round(16 N(0,1))) or zero", egg.RESIDUAL_INITS)
    rank: int = _arg(1, "rank r of the integer low-rank perturbations")
    sigma_shift: int = _arg(4, "noise scale sigma = 2^-sigma_shift")
    alpha: float = _arg(1.0, "z-test level of the update at generation 0 (1: every nonzero Z moves)")
    alpha_decay: float = _arg(6.0, "alpha decays to alpha * 2^-alpha_decay by the last generation (0: constant)")
    fitness: str = _arg("norm", "pair fitness: sign(f+ - f-) or the normalised difference", ist.FITNESS_MODES)
    tokens_per_update: int = _arg(64, "bytes each stream reads per generation")
    group_size: int = _arg(2, "members sharing one data stream (even: antithetic pairs share data)")
    dataset: str = _arg("stdlib", "corpus: stdlib, a text/JSONL file or directory, minipile, a HF dataset")
    cache_dir: str = _arg("", "corpus cache directory (empty: the default)")
    max_bytes: int = _arg(0, "cap on the corpus size in bytes (0: none)")
    seed: int = _arg(0, "random seed")
    generations: int = _arg(1500, "generation budget")
    time_limit: float = _arg(0.0, "stop after this many wall-clock seconds (0: no limit)")
    chunk: int = _arg(0, "members per vmap chunk on each device (0: all of them)")
    noise_reuse: int = _arg(1, "refresh the noise every k generations (0: never)")
    table_size: int = _arg(0, "int8 noise table entries (0: automatic)")
    eval_every: int = _arg(100, "evaluate held-out bits/byte every k generations")
    eval_streams: int = _arg(32, "held-out windows per evaluation")
    eval_tokens: int = _arg(256, "bytes per held-out window")
    run_dir: str = _arg("runs/egg", "run directory")
    checkpoint_every: int = _arg(100, "checkpoint every k generations (0: only at the end)")
    resume: bool = _arg(False, "continue from the run directory's checkpoint, if there is one")
    progress: bool = _arg(True, "progress bar on stderr (shown only in a terminal)")


def validate(cfg: Config) -> Config:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"egg config: {msg}")

    need(cfg.residual_init in egg.RESIDUAL_INITS,
         f"residual_init must be one of {egg.RESIDUAL_INITS}, got {cfg.residual_init!r}")
    need(cfg.layers >= 1 and cfg.width >= 1, f"layers and width must be >= 1, got {cfg.layers}, {cfg.width}")
    need(cfg.group_size >= 2 and cfg.group_size % 2 == 0,
         f"group_size must be even and >= 2 (antithetic pairs share data), got {cfg.group_size}")
    need(cfg.population >= 2 and cfg.population % cfg.group_size == 0,
         f"population {cfg.population} must be a positive multiple of group_size {cfg.group_size}")
    n_dev = jax.local_device_count()
    need(cfg.population % n_dev == 0, f"population {cfg.population} must be a multiple of the {n_dev} local devices")
    local = cfg.population // n_dev
    need(cfg.chunk >= 0 and (cfg.chunk == 0 or local % cfg.chunk == 0),
         f"chunk {cfg.chunk} must be 0 or divide the per-device population {local}")
    need(1 <= cfg.rank <= cfg.width, f"rank must be in [1, width={cfg.width}], got {cfg.rank}")
    need(0 <= cfg.sigma_shift <= 12, f"sigma_shift must be in [0, 12], got {cfg.sigma_shift}")
    need(0 < cfg.alpha <= 1, f"alpha must be in (0, 1], got {cfg.alpha}")
    need(cfg.alpha_decay >= 0, f"alpha_decay must be >= 0, got {cfg.alpha_decay}")
    need(cfg.fitness in ist.FITNESS_MODES, f"fitness must be one of {ist.FITNESS_MODES}, got {cfg.fitness!r}")
    need(cfg.tokens_per_update >= 1, f"tokens_per_update must be >= 1, got {cfg.tokens_per_update}")
    # |fitness| <= tokens * 24 bits * 16 per member; the update's sum f^2 r must stay < 2^23
    need(cfg.population // 2 * ist.NORM_FITNESS_MAX ** 2 * cfg.rank < (1 << 23),
         f"population x rank too large for the int32 z-test ({cfg.population} x {cfg.rank})")
    need(cfg.generations >= 0 and cfg.eval_every >= 1 and cfg.checkpoint_every >= 0,
         "generations >= 0, eval_every >= 1 and checkpoint_every >= 0 required")
    need(cfg.eval_streams >= 1 and cfg.eval_tokens >= 1, "eval_streams and eval_tokens must be >= 1")
    need(cfg.noise_reuse >= 0 and cfg.table_size >= 0 and cfg.max_bytes >= 0 and cfg.time_limit >= 0,
         "noise_reuse, table_size, max_bytes and time_limit must be >= 0")
    return cfg


class TrainState(NamedTuple):
    params: Any  # dict of int8 arrays
    hidden: jax.Array  # (population, layers, width) int8: each member's state, carried on


class Train(NamedTuple):
    cfg: Config
    splits: Any  # tasks.text.ByteSplits
    plan: nz.NoisePlan
    table: jax.Array  # int8 noise table
    var: int  # mean square of the table entries
    init: Callable[[], TrainState]
    batch: Callable[[int], np.ndarray]  # generation -> (streams, T + 1) uint8
    z16: Callable[[int], int]  # generation -> round(16 z) of that generation's level
    step: Callable  # (TrainState, tokens, generation, z16) -> (TrainState, int metrics)
    spec: StepSpec
    k_noise: jax.Array
    evaluate: Callable  # params -> held-out bits/byte (float)
    eval_tokens: np.ndarray  # (eval_streams, eval_tokens + 1) uint8


class StepSpec(NamedTuple):
    """The static settings of one generation (hashable: the compiled step is shared by every
    make_train in a process with the same spec and noise plan)."""

    population: int
    group_size: int
    chunk: int
    sigma_shift: int
    fitness: str
    var: int  # mean square of the noise-table entries


def generation(spec: StepSpec, plan, ts: TrainState, tokens, gen, z16, k_noise, table):
    """One generation, integer only: (state, tokens (streams, T + 1) uint8, generation, z16) ->
    (state, integer metrics)."""
    def member(m):
        noise = ist.member_noise(plan, k_noise, table, gen, m, spec.sigma_shift)
        h, s, _ = egg.sequence_logprob(ts.params, ts.hidden[m], tokens[m // spec.group_size], noise)
        return s, h

    fit, hidden = evaluate_population(member, spec.population, chunk=spec.chunk or None)
    params, moved, pf = ist.es_step(plan, k_noise, table, gen, ts.params, fit, mode=spec.fitness,
                                    z16=z16, var=spec.var)
    metrics = {"fitness_sum": jnp.sum(fit), "fitness_max": jnp.max(fit), "moved": moved,
               "pairs_nonzero": jnp.sum(pf != 0)}
    return TrainState(params, hidden), metrics


_generation_jit = jax.jit(generation, static_argnums=(0, 1), donate_argnums=2)


@jax.jit
def _heldout_bits(params, toks):
    """Mean exact cross-entropy (bits/byte, float: a metric) of the plain model on windows
    toks (n, T + 1), each read from a zero hidden state."""
    h0 = egg.init_hidden(params)
    toks = toks.astype(jnp.int32)
    _, logits = jax.vmap(egg.sequence_logits, (None, None, 0))(params, h0, toks[:, :-1])
    return -jnp.mean(i8.log2_prob_float(logits, toks[:, 1:]))


def load_splits(cfg: Config):
    from ..tasks.text import load_corpus

    return load_corpus(cfg.dataset, cfg.cache_dir or None, max_bytes=cfg.max_bytes or None)


def make_train(cfg: Config, splits=None) -> Train:
    """The pieces of a run. `splits` (tasks.text.ByteSplits) overrides loading cfg.dataset."""
    validate(cfg)
    from ..tasks.text import stream_windows

    splits = load_splits(cfg) if splits is None else splits
    if len(splits.train) < 2 or len(splits.valid) < 2:
        raise ValueError("the corpus needs at least 2 bytes in train and valid")
    key = jax.random.PRNGKey(cfg.seed)
    k_params, k_noise = jax.random.split(key)
    k_noise = jax.random.key_data(k_noise) if jnp.issubdtype(k_noise.dtype, jax.dtypes.prng_key) else k_noise
    params0 = egg.init_egg(k_params, cfg.layers, cfg.width, cfg.residual_init)
    plan = ist.make_plan(params0, cfg.rank, cfg.noise_reuse)
    n_pairs, n_streams = cfg.population // 2, cfg.population // cfg.group_size
    table = ist.make_table(k_noise, nz.required_table_size(plan, cfg.table_size or None, n_pairs))
    var = ist.table_variance(table)
    spec = StepSpec(cfg.population, cfg.group_size, cfg.chunk, cfg.sigma_shift, cfg.fitness, var)
    T = cfg.tokens_per_update

    def step(ts, tokens, gen, z16):
        return _generation_jit(spec, plan, ts, jnp.asarray(tokens), jnp.int32(gen), jnp.int32(z16), k_noise, table)

    eval_tokens = stream_windows(np.asarray(splits.valid), cfg.eval_streams, cfg.eval_tokens, 0, overlap=1)

    def evaluate(params):
        return float(_heldout_bits(params, jnp.asarray(eval_tokens)))

    def batch(gen):
        return stream_windows(splits.train, n_streams, T, gen, overlap=1)

    def z16(gen):
        return ist.z16_of_alpha(ist.alpha_at(cfg.alpha, cfg.alpha_decay, gen, cfg.generations))

    def init():
        hidden = jnp.zeros((cfg.population, cfg.layers, cfg.width), jnp.int8)
        return TrainState(params0, hidden)

    return Train(cfg, splits, plan, table, var, init, batch, z16, step, spec, k_noise, evaluate, eval_tokens)


def baselines(splits, eval_tokens) -> dict:
    """Unigram / bigram bits per byte on the validation split and on the evaluated windows."""
    from ..tasks.text import ByteSplits, ngram_bits_per_byte

    full = ngram_bits_per_byte(ByteSplits(splits.train, splits.valid, np.zeros(0, np.uint8)))
    sub = ngram_bits_per_byte(ByteSplits(splits.train, np.ascontiguousarray(eval_tokens[:, 1:]).ravel(),
                                         np.zeros(0, np.uint8)))
    return {"unigram_valid_bits_per_byte": full["unigram_valid"], "bigram_valid_bits_per_byte": full["bigram_valid"],
            "unigram_eval_bits_per_byte": sub["unigram_valid"], "bigram_eval_bits_per_byte": sub["bigram_valid"],
            "unigram_train_bits_per_byte": full["unigram_train"], "bigram_train_bits_per_byte": full["bigram_train"]}


def _resume_mismatch(cfg: Config, saved: dict) -> list[str]:
    return config_mismatch(cfg, saved, TRAJECTORY_FIELDS)


def run(cfg: Config, splits=None) -> dict:
    """Train with logging and checkpoints; returns the final summary dict."""
    validate(cfg)
    t0 = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoint"
    train = make_train(cfg, splits)
    state = train.init()
    meta: dict = {}
    if cfg.resume and (ckpt_dir / "arrays.safetensors").exists():
        saved = json.loads((ckpt_dir / "meta.json").read_text()).get("metadata", {})
        bad = _resume_mismatch(cfg, saved.get("config", {}))
        if bad:
            raise ValueError(f"cannot resume {ckpt_dir}: the config differs in fields that change "
                             f"training ({'; '.join(bad)}); use the original values or a new run_dir")
        state, meta = load_checkpoint(ckpt_dir, state._asdict())
        state = TrainState(**state)
    elif cfg.resume:
        print(f"[egg] --resume: no checkpoint in {ckpt_dir}, starting from scratch", file=sys.stderr)
    start = int(meta.get("generation", 0))
    base = baselines(train.splits, train.eval_tokens)
    lines = {"bigram_valid": base["bigram_eval_bits_per_byte"], "unigram_valid": base["unigram_eval_bits_per_byte"]}
    log = RunLog(run_dir, total=cfg.generations, resume_from=start if meta else None, wall_offset=meta.get("wall_s"),
                 plot_keys=[("valid_bits_per_byte", "train_bits_per_byte", "bigram_valid", "unigram_valid"),
                            ("moved",)],
                 postfix_keys=["valid_bits_per_byte", "train_bits_per_byte"],
                 progress=None if cfg.progress else False, desc="egg",
                 title=f"EGG int8 L{cfg.layers} d{cfg.width}, population {cfg.population}", start_time=t0)
    log.write_json("config", dataclasses.asdict(cfg))
    gen = start
    valid, valid_gen = meta.get("valid_bits_per_byte"), meta.get("valid_generation")
    if not meta:
        valid, valid_gen = train.evaluate(state.params), 0
        log.log(0, {"valid_bits_per_byte": valid, **lines})
    n_tok = cfg.population // cfg.group_size * cfg.tokens_per_update

    def checkpoint():
        save_checkpoint(ckpt_dir, state._asdict(),
                        {"generation": gen, "wall_s": log.elapsed, "valid_bits_per_byte": valid,
                         "valid_generation": valid_gen, "config": dataclasses.asdict(cfg)})

    try:
        while gen < cfg.generations:
            if cfg.time_limit and log.elapsed >= cfg.time_limit:
                log.print(f"[egg] time limit {cfg.time_limit} s reached at generation {gen}")
                break
            state, m = train.step(state, train.batch(gen), gen, train.z16(gen))
            gen += 1
            m = jax.device_get(m)
            rec = {"train_bits_per_byte": -float(m["fitness_sum"]) / (16 * cfg.population * cfg.tokens_per_update),
                   "moved": int(m["moved"]), "pairs_nonzero": int(m["pairs_nonzero"]),
                   "alpha": ist.alpha_at(cfg.alpha, cfg.alpha_decay, gen - 1, cfg.generations),
                   "train_bytes": gen * n_tok}
            if gen % cfg.eval_every == 0 or gen == cfg.generations:
                valid, valid_gen = train.evaluate(state.params), gen
                rec.update(valid_bits_per_byte=valid, **lines)
            log.log(gen, rec)
            if gen == cfg.generations or (cfg.checkpoint_every and gen % cfg.checkpoint_every == 0):
                checkpoint()
        if valid_gen != gen:
            valid, valid_gen = train.evaluate(state.params), gen
            log.log(gen, {"valid_bits_per_byte": valid, **lines})
        checkpoint()
        result = {
            "valid_bits_per_byte": valid,
            **base,
            "beats_bigram": bool(valid < base["bigram_eval_bits_per_byte"]),
            "population": cfg.population,
            "generations": gen,
            "train_bytes": gen * n_tok,
            "wall_s": round(log.elapsed, 3),
            "session_wall_s": round(time.perf_counter() - t0, 3),
            "num_params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(state.params))),
            "eval_bytes": int(train.eval_tokens[:, 1:].size),
            "run_dir": str(run_dir),
        }
        log.write_json("result", result)
    finally:
        log.close()
    return result
