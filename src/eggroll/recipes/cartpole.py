"""CartPole-v1 (gymnax): an MLP policy trained with EGGROLL, or full-rank OpenES as a baseline.

    eggroll train cartpole                        # EGGROLL; stops once the policy scores >= 475
    eggroll train cartpole --strategy open_es     # full-rank OpenES, same recipe
    eggroll train cartpole --resume               # continue runs/cartpole-eggroll exactly

One generation is one jax.jit call:

  1. Rollouts. Every population member m plays `episodes` episodes with the deterministic policy
     argmax(mlp(params + sigma * E_m, obs)), each a lax.scan over the 500 steps of CartPole-v1.
     gymnax resets an episode automatically when it ends, so the return only counts rewards while
     the episode is alive (a mask); fitness_m = mean return over its episodes. All members of a
     generation play the same start states (common random numbers), so fitness differences come
     from the perturbations alone. The population is sharded over all local devices.
  2. Update. es.tell turns the fitness vector into a descent direction; optax applies it.

Every `eval_every` generations the unperturbed policy (noise=None) plays `eval_episodes` fresh
episodes; its mean return is `eval_return`, and training stops once it reaches `target_return`
or the generation budget is spent. The run directory holds metrics.jsonl, curve.png,
config.json, result.json and checkpoint/ (params, optimizer state, ES state, the rollout RNG key
and, in its metadata, the generation, env steps and wall clock). Every random number is a
function of the seed and the checkpointed state, so `--resume` reproduces an uninterrupted run
bit for bit.

Several processes (`--coordinator HOST:PORT --num-processes P --process-id I`, see
docs/DISTRIBUTED.md): the population is split over every device of every process, only the
fitness (and episode lengths) are all-gathered, and every process applies the same update.
Process 0 writes the run directory; every process can read the checkpoint to resume. Each
metrics record carries `comm_bytes_per_process`: the bytes one process contributes to the
generation's collectives, measured from the compiled program.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from .. import distributed
from ..models.mlp import ACTIVATIONS, init_mlp, mlp
from ..population import evaluate_population, population_mesh
from ..shaping import SHAPINGS
from ..strategy import STRATEGIES
from ..cli import flag

ENV_NAME = "CartPole-v1"
OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
}
# Config fields that change the training trajectory: a resumed run must match them.
TRAJECTORY_FIELDS = ("strategy", "population", "sigma", "rank", "lr", "optimizer", "hidden",
                     "activation", "shaping", "antithetic", "noise_reuse", "episodes", "seed")


_arg = flag  # Config field -> CLI flag (eggroll.cli.flag)


@dataclass
class Config:
    strategy: str = _arg("eggroll", "evolution strategy", STRATEGIES)
    population: int = _arg(64, "population size (even; a multiple of the device count, all processes)")
    sigma: float = _arg(0.2, "noise scale")
    rank: int = _arg(1, "rank of the EGGROLL perturbations (ignored by open_es)")
    lr: float = _arg(0.05, "learning rate")
    optimizer: str = _arg("adam", "optax optimizer", OPTIMIZERS)
    hidden: str = _arg("16,16", "hidden layer sizes, comma separated")
    activation: str = _arg("tanh", "hidden activation", ACTIVATIONS)
    shaping: str = _arg("centered_rank", "fitness shaping", [s for s in SHAPINGS if s != "group_z_score"])
    antithetic: bool = _arg(True, "antithetic (mirrored) noise pairs")
    noise_reuse: int = _arg(1, "refresh the noise every k generations (0: never)")
    generations: int = _arg(200, "generation budget")
    episodes: int = _arg(1, "episodes per member per generation (fitness = mean return)")
    eval_every: int = _arg(5, "evaluate the mean policy every k generations")
    eval_episodes: int = _arg(16, "episodes per evaluation of the mean policy")
    target_return: float = _arg(475.0, "stop once the mean policy's eval return reaches this")
    seed: int = _arg(0, "random seed")
    chunk: int = _arg(0, "members per vmap chunk on each device (0: all of them)")
    run_dir: str = _arg("", "run directory; empty: runs/cartpole-<strategy>")
    checkpoint_every: int = _arg(25, "checkpoint every k generations (0: only at the end)")
    resume: bool = _arg(False, "continue from the run directory's checkpoint, if there is one")
    progress: bool = _arg(True, "progress bar on stderr (shown only in a terminal)")


def hidden_sizes(hidden) -> tuple[int, ...]:
    """'16,16' / 16 / (16, 16) -> (16, 16)."""
    if isinstance(hidden, int):
        hidden = (hidden,)
    if isinstance(hidden, str):
        parts = [p.strip() for p in hidden.replace(" ", ",").split(",") if p.strip()]
        try:
            hidden = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"hidden must be comma-separated positive integers, got {hidden!r}") from None
    hidden = tuple(hidden)
    if not hidden or any(not isinstance(h, (int, np.integer)) or h < 1 for h in hidden):
        raise ValueError(f"hidden must be one or more positive integers, got {hidden!r}")
    return tuple(int(h) for h in hidden)


def validate(cfg: Config) -> Config:
    """Raise ValueError with a clear message for a bad config; returns cfg."""
    def need(ok, msg):
        if not ok:
            raise ValueError(f"cartpole config: {msg}")

    need(cfg.strategy in STRATEGIES, f"strategy must be one of {sorted(STRATEGIES)}, got {cfg.strategy!r}")
    need(cfg.optimizer in OPTIMIZERS, f"optimizer must be one of {sorted(OPTIMIZERS)}, got {cfg.optimizer!r}")
    need(cfg.activation in ACTIVATIONS, f"activation must be one of {sorted(ACTIVATIONS)}, got {cfg.activation!r}")
    need(cfg.shaping in SHAPINGS and cfg.shaping != "group_z_score",
         f"shaping must be one of {sorted(set(SHAPINGS) - {'group_z_score'})}, got {cfg.shaping!r}")
    need(isinstance(cfg.population, int) and cfg.population >= 2, f"population must be an integer >= 2, got {cfg.population!r}")
    need(not cfg.antithetic or cfg.population % 2 == 0, f"antithetic sampling needs an even population, got {cfg.population}")
    n_dev = jax.device_count()  # every device of every process shares the population
    need(cfg.population % n_dev == 0,
         f"population {cfg.population} must be a multiple of the {n_dev} devices"
         + (f" of all {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    need(cfg.chunk >= 0 and (cfg.chunk == 0 or (cfg.population // n_dev) % cfg.chunk == 0),
         f"chunk {cfg.chunk} must be 0 or divide the per-device population {cfg.population // n_dev}")
    need(math.isfinite(cfg.sigma) and cfg.sigma > 0, f"sigma must be a finite number > 0, got {cfg.sigma}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, f"lr must be a finite number > 0, got {cfg.lr}")
    sizes = hidden_sizes(cfg.hidden)
    need(cfg.rank >= 1, f"rank must be >= 1, got {cfg.rank}")
    if cfg.strategy == "eggroll":
        smallest = min((4, *sizes, 2))  # obs dim 4, actions 2: every weight matrix has min(m, n) >= this
        need(cfg.rank <= smallest,
             f"rank {cfg.rank} exceeds the smallest weight-matrix dimension {smallest} "
             f"(obs 4, hidden {sizes}, actions 2)")
    need(cfg.noise_reuse >= 0, f"noise_reuse must be >= 0, got {cfg.noise_reuse}")
    need(cfg.generations >= 0, f"generations must be >= 0, got {cfg.generations}")
    need(cfg.episodes >= 1, f"episodes must be >= 1, got {cfg.episodes}")
    need(cfg.eval_every >= 1, f"eval_every must be >= 1, got {cfg.eval_every}")
    need(cfg.eval_episodes >= 1, f"eval_episodes must be >= 1, got {cfg.eval_episodes}")
    need(cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {cfg.checkpoint_every}")
    need(not math.isnan(cfg.target_return), "target_return must not be NaN (use inf to disable early stopping)")
    return cfg


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    es_state: Any  # eggroll.ESState
    rng: jax.Array  # raw uint32[2] key for the rollouts' start states


class Train(NamedTuple):
    """What make_train returns."""

    cfg: Config
    env: Any
    env_params: Any
    es: Any  # eggroll.ES
    optimizer: optax.GradientTransformation
    init: Callable[[], TrainState]  # the generation-0 state
    step: Callable  # TrainState -> (TrainState, metrics): one generation, one jitted call
    evaluate: Callable  # jitted: (params, generation) -> (eval_episodes,) returns of the mean policy
    rollout: Callable  # (params, noise, key) -> (return, length) of one episode
    communication: Callable  # TrainState -> bytes a generation sends (distributed.communication)


def make_train(cfg: Config) -> Train:
    validate(cfg)
    try:
        import gymnax  # imported here: only this recipe needs it, and it takes ~1 s
    except ModuleNotFoundError as e:  # gymnax 1.0.1 imports `six` without depending on it
        raise ModuleNotFoundError(f"the cartpole recipe needs gymnax, whose import failed: {e}. "
                                  "Install the missing module (e.g. `pip install six`).") from e

    env, env_params = gymnax.make(ENV_NAME)
    obs_dim = int(np.prod(env.observation_space(env_params).shape))
    n_actions = int(env.num_actions)
    sizes = (obs_dim, *hidden_sizes(cfg.hidden), n_actions)
    horizon = int(env_params.max_steps_in_episode)

    if cfg.strategy == "eggroll":
        es = STRATEGIES["eggroll"](cfg.population, cfg.sigma, cfg.rank, antithetic=cfg.antithetic,
                                   noise_reuse=cfg.noise_reuse, shaping=cfg.shaping)
    else:
        es = STRATEGIES[cfg.strategy](cfg.population, cfg.sigma, antithetic=cfg.antithetic,
                                      noise_reuse=cfg.noise_reuse, shaping=cfg.shaping)
    optimizer = OPTIMIZERS[cfg.optimizer](cfg.lr)
    key = jax.random.PRNGKey(cfg.seed)
    k_params, k_es, k_rollout, k_eval = jax.random.split(key, 4)

    def policy(params, obs, noise=None):
        return jnp.argmax(mlp(params, obs, noise, activation=cfg.activation))

    def rollout(params, noise, key):
        """One episode of at most `horizon` steps -> (return, length). gymnax auto-resets after
        `done`; those steps are masked out. The step key only drives that (masked) reset."""
        k_reset, k_step = jax.random.split(key)
        obs, env_state = env.reset(k_reset, env_params)

        def step(carry, _):
            obs, env_state, alive, ret, length = carry
            action = policy(params, obs, noise)
            obs, env_state, reward, terminated, truncated, _ = env.step(k_step, env_state, action, env_params)
            ret = ret + alive * reward
            length = length + alive.astype(jnp.int32)
            alive = alive * (1.0 - jnp.logical_or(terminated, truncated).astype(jnp.float32))
            return (obs, env_state, alive, ret, length), None

        carry = (obs, env_state, jnp.float32(1.0), jnp.float32(0.0), jnp.int32(0))
        (_, _, _, ret, length), _ = lax.scan(step, carry, None, length=horizon)
        return ret, length

    episodes = jax.vmap(rollout, in_axes=(None, None, 0))

    def generation(ts: TrainState):
        rng, k_gen = jax.random.split(ts.rng)
        keys = jax.random.split(k_gen, cfg.episodes)  # shared by all members (common random numbers)

        def member(m):
            ret, length = episodes(ts.params, es.noise(ts.es_state, m), keys)
            return ret.mean(), length.sum()

        fitness, lengths = evaluate_population(member, cfg.population, chunk=cfg.chunk or None)
        grad, es_state, metrics = es.tell(ts.es_state, fitness)
        updates, opt_state = optimizer.update(grad, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        metrics = {**metrics, "env_steps": lengths.sum(), "update_norm": _global_norm(updates)}
        # The noise table never changes: leave it out of the outputs, or XLA copies it every call.
        return TrainState(params, opt_state, es_state.replace(table=None), rng), metrics

    def evaluate(params, generation):
        """Episode returns of the unperturbed policy on `eval_episodes` episodes (fresh per generation)."""
        keys = jax.random.split(jax.random.fold_in(k_eval, generation), cfg.eval_episodes)
        ret, _ = episodes(params, None, keys)
        return ret

    def init_params():
        params = init_mlp(k_params, sizes)
        return params, optimizer.init(params)

    # With several devices (of one or several processes) every array lives replicated on all of
    # them: the jitted functions then see the same input shardings on every call (no recompiles)
    # and the noise table is not broadcast to the devices again each generation. Placing a
    # placed array is free.
    mesh = population_mesh()
    place = lambda tree: distributed.replicate(tree, mesh)  # noqa: E731
    generation_jit, evaluate_jit, init_params_jit = jax.jit(generation), jax.jit(evaluate), jax.jit(init_params)

    def step_fn(ts: TrainState):
        ts = place(ts)
        new, metrics = generation_jit(ts)
        return new._replace(es_state=new.es_state.replace(table=ts.es_state.table)), metrics

    def evaluate_fn(params, generation):
        return evaluate_jit(place(params), generation)

    def init() -> TrainState:
        params, opt_state = init_params_jit()  # one small compile instead of many eager ops
        return place(TrainState(params, opt_state, es.init(k_es, params), k_rollout))

    def communication(ts: TrainState) -> dict:
        n_params = sum(np.size(x) for x in jax.tree_util.tree_leaves(ts.params))
        return distributed.communication(generation_jit, place(ts), n_params=n_params, mesh=mesh)

    return Train(cfg, env, env_params, es, optimizer, init, step_fn, evaluate_fn, rollout, communication)


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def _resume_mismatch(cfg: Config, saved: dict) -> list[str]:
    now = dataclasses.asdict(cfg)
    out = []
    for k in TRAJECTORY_FIELDS:
        a, b = now[k], saved.get(k)
        if k == "hidden":
            a, b = hidden_sizes(a), hidden_sizes(b) if b is not None else None
        if a != b:
            out.append(f"{k}: checkpoint {b!r} vs now {a!r}")
    return out


def run(cfg: Config) -> dict:
    """Train with logging, checkpoints and early stopping; returns the final summary dict."""
    validate(cfg)
    run_dir = Path(cfg.run_dir or f"runs/cartpole-{cfg.strategy}")
    ckpt_dir = run_dir / "checkpoint"
    t0 = time.perf_counter()
    train = make_train(cfg)
    state = train.init()

    meta: dict = {}
    have_checkpoint = distributed.checkpoint_exists(ckpt_dir)  # the same answer on every process
    if cfg.resume:
        if have_checkpoint:
            # compare configs first: clearer than a tensor-shape mismatch from load_checkpoint
            saved = json.loads((ckpt_dir / "meta.json").read_text()).get("metadata", {})
            bad = _resume_mismatch(cfg, saved.get("config", {}))
            if bad:
                raise ValueError(f"cannot resume {ckpt_dir}: the config differs in fields that change "
                                 f"training ({'; '.join(bad)}); use the original values or a new run_dir")
            state, meta = distributed.load_checkpoint(ckpt_dir, state)
        else:
            distributed.say(f"[cartpole] --resume: no checkpoint in {ckpt_dir}, starting from scratch")
    elif have_checkpoint:
        distributed.say(f"[cartpole] starting a fresh run in {run_dir}; its checkpoint will be overwritten "
                        "(--resume continues it instead)")
    start = int(meta.get("generation", 0))

    log = distributed.run_log(run_dir, total=cfg.generations, resume_from=start if meta else None,
                              wall_offset=meta.get("wall_s"), plot_keys=[("eval_return", "fitness_mean", "fitness_max")],
                              postfix_keys=["eval_return", "fitness_mean"], progress=None if cfg.progress else False,
                              desc=f"cartpole {cfg.strategy}", title=f"CartPole-v1, {cfg.strategy}, population {cfg.population}",
                              start_time=t0)  # the wall clock includes set-up and compilation
    log.write_json("config", dataclasses.asdict(cfg))

    gen = start
    env_steps = int(meta.get("env_steps", 0))
    eval_return, eval_gen = meta.get("eval_return"), meta.get("eval_generation")
    if not meta:
        eval_return, eval_gen = float(train.evaluate(state.params, 0).mean()), 0
        log.log(0, {"eval_return": eval_return, "env_steps": 0})
    solved = eval_return is not None and eval_return >= cfg.target_return
    last_plot = time.perf_counter()

    comm = train.communication(state)
    comm_rec = {k: v for k, v in comm.items() if k in ("comm_bytes_per_process", "comm_bytes_sent_per_process")}

    def checkpoint():  # process 0 writes; every process checks that its replica agrees
        distributed.save_checkpoint(ckpt_dir, state,
                                    {"generation": gen, "env_steps": env_steps, "wall_s": log.elapsed,
                                     "eval_return": eval_return, "eval_generation": eval_gen, "solved": solved,
                                     "config": dataclasses.asdict(cfg)})

    try:
        while gen < cfg.generations and not solved:
            state, m = train.step(state)
            gen += 1
            m = jax.device_get(m)
            env_steps += int(m.pop("env_steps"))
            rec = {k: float(v) for k, v in m.items()}
            rec["env_steps"] = env_steps
            rec.update(comm_rec)
            if gen % cfg.eval_every == 0 or gen == cfg.generations:
                eval_return, eval_gen = float(train.evaluate(state.params, gen).mean()), gen
                rec["eval_return"] = eval_return
                solved = eval_return >= cfg.target_return
            log.log(gen, rec)
            if solved or gen == cfg.generations or (cfg.checkpoint_every and gen % cfg.checkpoint_every == 0):
                checkpoint()
                if time.perf_counter() - last_plot > 30:
                    log.plot()
                    last_plot = time.perf_counter()
        if eval_gen != gen:  # resumed past the budget from a checkpoint taken between evaluations
            eval_return, eval_gen = float(train.evaluate(state.params, gen).mean()), gen
            solved = eval_return >= cfg.target_return
        result = {
            "final_return": eval_return,
            "solved": bool(solved),
            "generations": gen,
            "env_steps": env_steps,
            "wall_s": round(log.elapsed, 3),
            "session_wall_s": round(time.perf_counter() - t0, 3),
            "strategy": cfg.strategy,
            "population": cfg.population,
            "num_params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(state.params))),
            "run_dir": str(run_dir),
            "processes": jax.process_count(),
            "devices": jax.device_count(),
            "communication": comm,
        }
        log.write_json("result", result)
    finally:
        log.close()
    return result
