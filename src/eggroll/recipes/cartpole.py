"""CartPole-v1 (gymnax): an MLP policy trained with EGGROLL, or full-rank OpenES as a baseline.

    eggroll train cartpole                        # EGGROLL; stops once the policy scores >= 475
    eggroll train cartpole --strategy open_es     # full-rank OpenES, same recipe
    eggroll train cartpole --resume               # continue runs/cartpole-eggroll exactly

One generation is one jax.jit call:

  1. Rollouts. Every population member m plays `episodes` episodes with the deterministic policy
     argmax(mlp(params + sigma * E_m, obs)), each a lax.scan over the 500 steps of CartPole-v1
     (`tasks.rl.episode`, the rollout every RL recipe uses). gymnax resets an episode
     automatically when it ends, so the return only counts rewards while the episode is alive (a
     mask); fitness_m = mean return over its episodes. All members of a generation play the same
     start states (common random numbers), so fitness differences come from the perturbations
     alone. The population is sharded over every device of every process.
  2. Update. es.tell turns the fitness vector into a descent direction; optax applies it.

Every `eval_every` generations the unperturbed policy (noise=None) plays `eval_episodes` fresh
episodes; its mean return is `eval_return`, and training stops once it reaches `target_return`
or the generation budget is spent. The run directory (metrics.jsonl,
curve.png, config.json, result.json, checkpoint/) and `--resume` are the harness's
(`eggroll.harness`); every random number is a function of the seed and the checkpointed state
(params, optimizer state, ES state, rollout key), so a resumed run equals an uninterrupted one
bit for bit.

Several processes (`--coordinator HOST:PORT --num-processes P --process-id I`, see
docs/DISTRIBUTED.md): the population is split over every device of every process, only the
fitness (and episode lengths) are all-gathered, and every process applies the same update.
Process 0 writes the run directory; every process can read the checkpoint to resume. Each
metrics record carries `comm_bytes_per_process`: the bytes one process contributes to the
generation's collectives, measured from the compiled program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from .. import distributed, harness
from ..config import OPTIMIZERS, flag, hidden_sizes
from ..models.mlp import ACTIVATIONS, init_mlp
from ..population import evaluate_population
from ..shaping import SHAPINGS
from ..strategy import FLOAT_STRATEGIES, make_strategy
from ..tasks import rl as rlt

ENV_NAME = "CartPole-v1"
# Config fields that change the training trajectory: a resumed run must match them.
TRAJECTORY_FIELDS = ("strategy", "population", "sigma", "rank", "lr", "optimizer", "hidden",
                     "activation", "shaping", "antithetic", "noise_reuse", "episodes", "seed")


@dataclass
class Config(harness.RunConfig):
    strategy: str = flag("eggroll", "evolution strategy", FLOAT_STRATEGIES)
    population: int = flag(64, "population size (even; a multiple of the device count, all processes)")
    sigma: float = flag(0.2, "noise scale")
    rank: int = flag(1, "rank of the EGGROLL perturbations (ignored by open_es)")
    lr: float = flag(0.05, "learning rate")
    optimizer: str = flag("adam", "optax optimizer", ("adam", "adamw", "sgd"))
    hidden: str = flag("16,16", "hidden layer sizes, comma separated")
    activation: str = flag("tanh", "hidden activation", ACTIVATIONS)
    shaping: str = flag("centered_rank", "fitness shaping", [s for s in SHAPINGS if s != "group_z_score"])
    antithetic: bool = flag(True, "antithetic (mirrored) noise pairs")
    noise_reuse: int = flag(1, "refresh the noise every k generations (0: never)")
    episodes: int = flag(1, "episodes per member per generation (fitness = mean return)")
    eval_episodes: int = flag(16, "episodes per evaluation of the mean policy")
    target_return: float = flag(475.0, "stop once the mean policy's eval return reaches this")
    chunk: int = flag(0, "members per vmap chunk on each device (0: automatic, at most 1,024)")
    # the run fields' defaults for this recipe
    generations: int = flag(200, "generation budget")
    eval_every: int = flag(5, "evaluate the mean policy every k generations")
    checkpoint_every: int = flag(25, "checkpoint every k generations (0: only at the end)")


def validate(cfg: Config) -> Config:
    """Raise ValueError with a clear message for a bad config; returns cfg."""
    def need(ok, msg):
        if not ok:
            raise ValueError(f"cartpole config: {msg}")

    harness.check_run_config(cfg)
    for name, allowed in (("strategy", FLOAT_STRATEGIES), ("optimizer", tuple(OPTIMIZERS)),
                          ("activation", tuple(ACTIVATIONS)),
                          ("shaping", tuple(s for s in SHAPINGS if s != "group_z_score"))):
        need(getattr(cfg, name) in allowed, f"{name} must be one of {sorted(allowed)}, got {getattr(cfg, name)!r}")
    harness.check_population(cfg.population, cfg.chunk, antithetic=cfg.antithetic)
    need(math.isfinite(cfg.sigma) and cfg.sigma > 0, f"sigma must be a finite number > 0, got {cfg.sigma}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, f"lr must be a finite number > 0, got {cfg.lr}")
    sizes = hidden_sizes(cfg.hidden)
    need(cfg.rank >= 1, f"rank must be >= 1, got {cfg.rank}")
    if cfg.strategy == "eggroll":
        smallest = min((4, *sizes, 2))  # obs dim 4, actions 2: every weight matrix has min(m, n) >= this
        need(cfg.rank <= smallest, f"rank {cfg.rank} exceeds the smallest weight-matrix dimension {smallest} "
                                   f"(obs 4, hidden {sizes}, actions 2)")
    need(cfg.noise_reuse >= 0, f"noise_reuse must be >= 0, got {cfg.noise_reuse}")
    need(cfg.episodes >= 1, f"episodes must be >= 1, got {cfg.episodes}")
    need(cfg.eval_episodes >= 1, f"eval_episodes must be >= 1, got {cfg.eval_episodes}")
    need(not math.isnan(cfg.target_return), "target_return must not be NaN (use inf to disable early stopping)")
    return cfg


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    es_state: Any  # eggroll.ESState
    rng: jax.Array  # raw uint32[2] key for the rollouts' start states


def make_train(cfg: Config) -> harness.Train:
    """The science: policy, rollouts, one generation, evaluation; the harness does the rest."""
    validate(cfg)
    env = rlt.make_env(ENV_NAME)
    sizes = rlt.policy_sizes(env, hidden_sizes(cfg.hidden))
    es = make_strategy(cfg.strategy, cfg.population, cfg.sigma, cfg.rank, antithetic=cfg.antithetic,
                       noise_reuse=cfg.noise_reuse, shaping=cfg.shaping)
    optimizer = OPTIMIZERS[cfg.optimizer](cfg.lr)
    k_params, k_es, k_rollout, k_eval = jax.random.split(jax.random.PRNGKey(cfg.seed), 4)

    def episodes(params, noise, keys):
        return rlt.member_episodes(env, params, noise, keys, cfg.activation)

    def generation(ts: TrainState, ctx):
        rng, k_gen = jax.random.split(ts.rng)
        keys = jax.random.split(k_gen, cfg.episodes)  # shared by all members (common random numbers)

        def member(m):
            ret, length = episodes(ts.params, es.noise(ctx, ts.es_state, m), keys)
            return ret.mean(), length.sum()

        fitness, lengths = evaluate_population(member, cfg.population, chunk=cfg.chunk or None)
        grad, es_state, metrics = es.tell(ctx, ts.es_state, fitness)
        updates, opt_state = optimizer.update(grad, ts.opt_state, ts.params)
        metrics = {**metrics, "env_steps": lengths.sum(), "update_norm": optax.tree.norm(updates)}
        return TrainState(optax.apply_updates(ts.params, updates), opt_state, es_state, rng), metrics

    def evaluate(ts: TrainState, gen):
        """Mean return of the unperturbed policy on `eval_episodes` episodes (fresh per generation)."""
        keys = jax.random.split(jax.random.fold_in(k_eval, gen), cfg.eval_episodes)
        return {"eval_return": episodes(ts.params, None, keys)[0].mean()}

    def init_params():
        params = init_mlp(k_params, sizes)
        return params, optimizer.init(params)

    # every array lives replicated on every device of every process: the jitted functions see the
    # same input shardings on every call, and the noise table is placed once
    place = distributed.replicate
    generation_jit, evaluate_jit = jax.jit(generation), jax.jit(evaluate)
    params0, opt_state0 = jax.jit(init_params)()
    ctx = place(es.setup(k_es, params0))  # the noise context: a jit argument, never returned

    def communication(ts):
        n_params = sum(np.size(x) for x in jax.tree_util.tree_leaves(ts.params))
        return distributed.communication(generation_jit, place(ts), ctx, n_params=n_params)

    return harness.Train(
        name=f"cartpole-{cfg.strategy}",
        init=lambda: place(TrainState(params0, opt_state0, es.init(ctx), k_rollout)),
        step=lambda ts, gen: generation_jit(place(ts), ctx),
        evaluate=lambda ts, gen: evaluate_jit(place(ts), gen),
        trajectory=TRAJECTORY_FIELDS, title=f"CartPole-v1, {cfg.strategy}, population {cfg.population}",
        plot_keys=[("eval_return", "fitness_mean", "fitness_max")], postfix_keys=["eval_return", "fitness_mean"],
        totals=("env_steps",), done=lambda ev: ev["eval_return"] >= cfg.target_return,
        summary=lambda ts, r: {"final_return": r["eval_return"], "solved": bool(r["eval_return"] >= cfg.target_return),
                               "strategy": cfg.strategy, "population": cfg.population},
        communication=communication,
        canonical=lambda k, v: hidden_sizes(v) if k == "hidden" else v)


def run(cfg: Config) -> dict:
    """Train with the harness (logging, checkpoints, early stopping); returns the summary dict."""
    return harness.run(cfg, make_train)
