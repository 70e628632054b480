"""The run loop every recipe shares: run directory, resume, checkpoints, progress, metrics,
curves, time limit, periodic evaluation and several processes.

A recipe is a Config that inherits `RunConfig`, a `make_train(cfg) -> Train` and one line:

    def run(cfg: Config) -> dict:
        return harness.run(cfg, make_train)

`Train.init()` gives the generation-0 state, `Train.step(state, g)` runs generation g (one
jitted call) and returns (state, metrics), `Train.evaluate(state, g)` returns evaluation
metrics. Everything else is here:

  run_dir/config.json     the config (process 0 writes every file)
  run_dir/metrics.jsonl   one record per generation (+ generation 0's evaluation); on a resume
                          the records after the checkpoint are dropped, so none is duplicated
  run_dir/curve.png       learning curves (`Train.plot_keys`), redrawn at most every 30 s
  run_dir/checkpoint/     the state (atomic; process 0 writes after every process checked that
                          the replicas agree; every process reads it to resume) with, in its
                          metadata, the generation, wall clock, running totals, last evaluation
                          and the config
  run_dir/result.json     the last evaluation, totals, wall clock, devices, processes and the
                          recipe's `summary`; the CLI prints it as the final JSON line

`--resume` continues exactly: the state, the totals and the evaluation come from the
checkpoint, every random number is a function of (seed, generation), and a config that differs
in a field of `Train.trajectory` is refused with the list of differences. The noise context
(table, plan, key) is never checkpointed: it is rebuilt from the seed.

Several processes (`--coordinator/--num-processes/--process-id`): the recipe places its arrays
replicated over every device of every process (`distributed.replicate`); validation uses the
global device count (`check_population`); only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from . import checkpoint as ckpt
from . import distributed
from .config import flag

PLOT_EVERY_S = 30.0


@dataclass
class RunConfig:
    """The run fields every recipe Config inherits (a recipe may redeclare one to change its
    default)."""

    generations: int = flag(100, "generation budget")
    eval_every: int = flag(10, "evaluate every k generations")
    checkpoint_every: int = flag(50, "checkpoint every k generations (0: only at the end)")
    seed: int = flag(0, "random seed")
    run_dir: str = flag("", "run directory (empty: runs/<recipe>)")
    resume: bool = flag(False, "continue from the run directory's checkpoint, if there is one")
    time_limit: float = flag(0.0, "stop after this many seconds of wall clock (0: none); --resume continues")
    progress: bool = flag(True, "progress bar on stderr (shown only in a terminal)")


class Train(NamedTuple):
    """What a recipe's make_train returns to the harness."""

    name: str  # "cartpole": the default run directory runs/<name>, progress-bar label
    init: Callable[[], Any]  # -> the generation-0 state (a pytree of arrays; checkpointed)
    step: Callable[[Any, int], tuple]  # (state, generation g) -> (state after g, metrics dict)
    evaluate: Callable[[Any, int], dict]  # (state, generation) -> evaluation metrics
    trajectory: tuple = ()  # config fields a resumed run must match
    title: str = ""  # curve title
    plot_keys: Any = None  # metric groups to plot (runlog.RunLog)
    postfix_keys: Any = None  # metrics on the progress bar
    totals: tuple = ()  # per-generation metrics summed over the run (e.g. env_steps); resumable
    done: Callable[[dict], bool] | None = None  # early stop, given the last evaluation
    stop: Callable[[dict], bool] | None = None  # budget stop, given the last record (totals, train_s)
    summary: Callable[[Any, dict], dict] | None = None  # (state, result) -> extra result fields
    communication: Callable[[Any], dict] | None = None  # state -> bytes per generation (measured)
    canonical: Callable[[str, Any], Any] | None = None  # (field, value) -> comparable value


def check_run_config(cfg: RunConfig) -> None:
    """One-line ValueErrors for bad run fields."""
    for name, ok in (("generations", cfg.generations >= 0), ("eval_every", cfg.eval_every >= 1),
                     ("checkpoint_every", cfg.checkpoint_every >= 0),
                     ("time_limit", math.isfinite(cfg.time_limit) and cfg.time_limit >= 0)):
        if not ok:
            raise ValueError(f"{name} must be {'>= 1' if name == 'eval_every' else '>= 0'}, got {getattr(cfg, name)!r}")


def check_population(population: int, chunk: int = 0, *, antithetic: bool = True) -> int:
    """Population checks against every device of every process; returns the per-device share."""
    if not isinstance(population, int) or population < 2:
        raise ValueError(f"population must be an integer >= 2, got {population!r}")
    if antithetic and population % 2:
        raise ValueError(f"antithetic sampling needs an even population, got {population}")
    n_dev = jax.device_count()
    where = f" of all {jax.process_count()} processes" if jax.process_count() > 1 else ""
    if population % n_dev:
        raise ValueError(f"population {population} must be a multiple of the {n_dev} devices{where}")
    local = population // n_dev
    if chunk < 0 or (chunk and local % chunk):
        raise ValueError(f"chunk {chunk} must be 0 or divide the per-device population {local}")
    return local


def mismatch(cfg, saved: dict, fields, canonical=None) -> list[str]:
    """'field: checkpoint X vs now Y' for every trajectory field that differs."""
    now = dataclasses.asdict(cfg)
    same = canonical or (lambda k, v: v)
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in fields
            if k not in saved or same(k, saved[k]) != same(k, now[k])]


def checked_metadata(cfg, directory: Path, fields, canonical=None) -> dict:
    """The checkpoint's metadata, after refusing (one-line ValueError) a config that differs from
    the saved one in a field that changes training."""
    meta = ckpt.read_metadata(directory)
    bad = mismatch(cfg, meta.get("config", {}), fields, canonical)
    if bad:
        raise ValueError(f"cannot resume {directory}: the config differs in fields that change training "
                         f"({'; '.join(bad)}); use the original values or a new run_dir")
    return meta


def restore(cfg: RunConfig, train: Train, directory: Path, state):
    """(state, metadata) from the run's checkpoint when resuming, else (state, {})."""
    exists = distributed.checkpoint_exists(directory)  # the same answer on every process
    if not cfg.resume:
        if exists:
            distributed.say(f"[{train.name}] starting a fresh run in {directory.parent}; its checkpoint will be "
                            "overwritten (--resume continues it instead)")
        return state, {}
    if not exists:
        distributed.say(f"[{train.name}] --resume: no checkpoint in {directory}, starting from scratch")
        return state, {}
    checked_metadata(cfg, directory, train.trajectory, train.canonical)
    return distributed.load_checkpoint(directory, state)


def host_metrics(metrics: dict) -> dict:
    """Device metrics -> JSON-able host values (scalars as Python numbers)."""
    out = {}
    for k, v in jax.device_get(metrics).items():
        a = np.asarray(v)
        out[k] = a.item() if a.ndim == 0 else a.tolist()
    return out


def run(cfg: RunConfig, make_train: Callable[[Any], Train]) -> dict:
    """Train `make_train(cfg)` with logging, checkpoints, evaluation and early stopping; returns
    the result dict (also written to run_dir/result.json)."""
    t0 = time.perf_counter()  # the wall clock includes set-up and compilation
    check_run_config(cfg)
    train = make_train(cfg)
    run_dir = Path(cfg.run_dir or f"runs/{train.name}")
    directory = run_dir / "checkpoint"
    state, meta = restore(cfg, train, directory, train.init())
    start = int(meta.get("generation", 0))
    log = distributed.run_log(run_dir, total=cfg.generations, resume_from=start if meta else None,
                              wall_offset=meta.get("wall_s"), plot_keys=train.plot_keys,
                              postfix_keys=train.postfix_keys, progress=None if cfg.progress else False,
                              desc=train.name, title=train.title, start_time=t0)
    log.write_json("config", dataclasses.asdict(cfg))
    comm = train.communication(state) if train.communication else {}
    loop = _Loop(cfg, train, log, directory, state, meta, comm)
    try:
        result = loop.run(start)
        result["session_wall_s"] = round(time.perf_counter() - t0, 3)
        result["run_dir"] = str(run_dir)
        log.write_json("result", result)
    finally:
        log.close()
    return result


class _Loop:
    """The generation loop of `run` (its state: generation, totals, last evaluation)."""

    def __init__(self, cfg, train: Train, log, directory, state, meta: dict, comm: dict):
        self.cfg, self.train, self.log, self.directory, self.state, self.comm = cfg, train, log, directory, state, comm
        self.totals = {k: meta.get("totals", {}).get(k, 0) for k in train.totals}
        self.evaluation, self.eval_gen = meta.get("evaluation"), meta.get("eval_generation")
        self.eval_s = float(meta.get("eval_s", 0.0))  # wall clock spent evaluating (train_s excludes it)
        self.saved_gen, self.gen, self.stopped = None, 0, "budget"
        self.record = meta.get("record", {})  # the last generation's record (for `stop`)
        self.budget_hit = False  # set once per generation by check_budget

    def evaluate(self) -> dict:
        t = time.perf_counter()
        self.evaluation, self.eval_gen = host_metrics(self.train.evaluate(self.state, self.gen)), self.gen
        self.eval_s += time.perf_counter() - t
        return self.evaluation

    def train_s(self) -> float:
        return round(self.log.elapsed - self.eval_s, 4)

    def check_budget(self) -> None:
        """Decide once per generation whether the budget (`Train.stop`) is spent: agreed by every
        process, since it may read a clock that differs between them."""
        hit = bool(self.train.stop and self.gen > 0 and self.train.stop({**self.record, **self.totals,
                                                                         "train_s": self.train_s()}))
        self.budget_hit = _agree(hit) if self.train.stop else False

    def time_up(self) -> bool:
        """The time limit, agreed by every process (their wall clocks differ)."""
        return bool(self.cfg.time_limit) and _agree(self.log.elapsed >= self.cfg.time_limit)

    def done(self) -> bool:
        return bool(self.train.done and self.evaluation is not None and self.train.done(self.evaluation))

    def checkpoint(self) -> None:
        distributed.save_checkpoint(self.directory, self.state, {
            "generation": self.gen, "wall_s": self.log.elapsed, "totals": self.totals,
            "evaluation": self.evaluation, "eval_generation": self.eval_gen, "eval_s": self.eval_s,
            "record": self.record, "config": dataclasses.asdict(self.cfg)})
        self.saved_gen = self.gen

    def one_generation(self) -> None:
        cfg, train = self.cfg, self.train
        self.state, metrics = train.step(self.state, self.gen)
        self.gen += 1
        rec = host_metrics(metrics)
        for k in self.totals:
            self.totals[k] += rec.pop(k)
        rec.update(self.totals)
        rec.update({k: v for k, v in self.comm.items() if k in ("comm_bytes_per_process", "comm_bytes_sent_per_process")})
        self.record = rec
        self.check_budget()
        if self.gen % cfg.eval_every == 0 or self.gen == cfg.generations or self.budget_hit:
            rec.update(self.evaluate())
        rec["train_s"] = self.train_s()
        self.log.log(self.gen, rec)

    def run(self, start: int) -> dict:
        cfg, log = self.cfg, self.log
        self.gen = start
        if self.evaluation is None:  # a fresh run: generation 0's evaluation
            log.log(0, {**self.evaluate(), **self.totals})
        last_plot = time.perf_counter()
        self.check_budget()  # a resumed run may already be past its budget
        while self.gen < cfg.generations and not self.done() and not self.budget_hit:
            if self.time_up():
                log.print(f"[{self.train.name}] time limit {cfg.time_limit} s reached at generation {self.gen}")
                self.stopped = "time_limit"
                break
            self.one_generation()
            last = self.done() or self.budget_hit or self.gen == cfg.generations
            if last or (cfg.checkpoint_every and self.gen % cfg.checkpoint_every == 0):
                self.checkpoint()
                if time.perf_counter() - last_plot > PLOT_EVERY_S:
                    log.plot()
                    last_plot = time.perf_counter()
        if self.eval_gen != self.gen:  # stopped between evaluations (time limit, resumed past the budget)
            log.log(self.gen, self.evaluate())
        if self.saved_gen != self.gen:
            self.checkpoint()
        if self.done():
            self.stopped = "done"
        result = {**self.evaluation, **self.totals, "generations": self.gen, "stopped": self.stopped,
                  "wall_s": round(log.elapsed, 3), "train_s": round(self.train_s(), 3), "eval_s": round(self.eval_s, 3),
                  "num_params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(_params_of(self.state)))),
                  "processes": jax.process_count(), "devices": jax.device_count(), "communication": self.comm}
        if self.train.summary:
            result.update(self.train.summary(self.state, result))
        return result


def _agree(flag: bool) -> bool:
    """True on every process if it is True on any (one small host all-gather when several run)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(distributed.allgather_host(np.asarray([int(bool(flag))], np.int32)).any())


def _params_of(state):
    """The `params` field of a state (NamedTuple or dict), else the whole state."""
    if hasattr(state, "params"):
        return state.params
    return state.get("params", state) if isinstance(state, dict) else state
