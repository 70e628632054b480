"""RL on any supported JAX environment: EGGROLL, full-rank OpenES or PPO, over several seeds.

    eggroll train rl --env CartPole-v1 --strategy eggroll --seeds 3 --budget-steps 500000
    eggroll train rl --env MPE_simple_spread_v3 --strategy open_es      # paper preset (see PRESETS)
    eggroll train rl --env brax/hopper --strategy ppo --budget-wall-s 300
    eggroll train rl --env my_pkg.envs:make_my_env                       # your own environment
    eggroll train rl ... --resume                                        # continue an interrupted run

Environments come from eggroll.tasks.rl.make_env (gymnax, brax, jumanji, navix, craftax, kinetix,
jaxmarl MPE, or a "module:function" factory returning an Env). The policy is an MLP
(models/mlp.py) over the env's flat observation; MPE agents share it (agent id in the obs).

ES (eggroll / open_es): one jitted call per generation. Every member plays `episodes` episodes
with the deterministic policy of params + sigma * E_m; all members play the same start states
(common random numbers); fitness = mean return; es.tell -> optax (adam / adamw / sgd) with the
learning rate decayed linearly to lr * lr_decay as the budget is spent: the factor of generation
g is 1 - (1 - lr_decay) * f, f the larger fraction spent before g of the env-step budget and of
the training wall clock (`budget_wall_s`, if set), so the decay ends where the run does,
whichever budget stops it and however short its episodes are (`generations` is only a cap: a
resumed run may raise it).
PPO: eggroll.baselines.ppo on the same adapters and the same MLP sizes; its learning rate
anneals to 0 over the same fraction (`--anneal-lr`, default on). `--obs-norm`: every method's
policy sees observations normalised by running statistics (tasks.rl.ObsStats; ES: updated from
every member's observations after each generation; PPO: from each rollout), part of the state.

Each seed is one run of the harness (eggroll.harness) in run_dir/seed<k> (metrics.jsonl,
curve.png, config.json, result.json, checkpoint/): it trains until `budget_steps` env steps (or
`budget_wall_s` seconds of training, if set; `generations` caps it) are spent; every
`eval_every` generations the deterministic unperturbed policy plays `eval_episodes` fresh
episodes (eval_return). One compile serves all seeds (the seed and the ES noise context are jit
arguments). `--resume` continues an interrupted seed exactly (the checkpoint holds the whole
state: params, optimizer, ES state or PPO environments, observation statistics, budget
progress, keys) and skips the finished ones.
run_dir/config.json and run_dir/result.json sum the seeds up. The final JSON: env, strategy,
mean_return (mean over seeds of the final eval return), stderr (over seeds), wall_s (mean per
seed of the training wall clock: set-up and compilation are done once before the seeds and
reported as compile_s; evaluations are excluded), env_steps (mean per seed), communication,
plus per-seed details. Hyperparameters: flags > PRESETS[env] > DEFAULTS (recipes/rl_presets.py).

Several processes (`--coordinator HOST:PORT --num-processes P --process-id I`, see
docs/DISTRIBUTED.md and docs/RL.md): ES shards the population over every device of every
process (only fitness and episode lengths are all-gathered); PPO splits its num_envs
environments over every device and sums the devices' gradients (data parallel). Process 0
writes every file. `communication` (result) and `comm_bytes_per_process` (every record) are
the bytes one generation / update sends, measured from the compiled program.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from .. import distributed, harness
from ..config import OPTIMIZERS, flag
from ..models.mlp import ACTIVATIONS, init_mlp
from ..runlog import write_json
from ..shaping import SHAPINGS
from ..strategy import make_strategy
from ..tasks import rl as rlt
from .rl_presets import DEFAULTS, PRESETS, canonical, preset_key, resolve  # noqa: F401 (rl.PRESETS etc.)

METHODS = ("eggroll", "open_es", "ppo")

# Hyperparameters only one kind of method uses: giving one to the other is an error, not ignored.
ES_ONLY = ("population", "sigma", "rank", "lr", "lr_decay", "optimizer", "shaping", "episodes")
PPO_ONLY = ("ppo_lr", "num_envs", "rollout_len", "ppo_epochs", "minibatches", "gamma", "gae_lambda", "clip_eps",
            "ent_coef", "vf_coef", "max_grad_norm", "grad_reduce")
# Config fields that change one seed's training (compared through the presets on --resume); the
# budgets are among them since the learning-rate schedules follow them.
SHARED_TRAJECTORY = ("env", "strategy", "budget_steps", "budget_wall_s", "hidden", "activation", "max_steps",
                     "obs_norm", "eval_episodes", "seed")
ES_TRAJECTORY = (*SHARED_TRAJECTORY, *ES_ONLY)
PPO_TRAJECTORY = (*SHARED_TRAJECTORY, *PPO_ONLY, "anneal_lr", "clip_vloss")


@dataclass
class Config(harness.RunConfig):
    env: str = flag("CartPole-v1", "environment name (see eggroll.tasks.rl) or module:function")
    strategy: str = flag("eggroll", "training method", METHODS)
    seeds: int = flag(1, "number of seeds (seed, seed+1, ...)")
    budget_steps: int = flag(200_000, "env steps per seed")
    budget_wall_s: float = flag(0.0, "training seconds per seed (0: no limit; evaluations excluded)")
    population: int | None = flag(None, "ES population (even; multiple of the device count, all processes)")
    sigma: float | None = flag(None, "ES noise scale")
    rank: int | None = flag(None, "EGGROLL rank")
    lr: float | None = flag(None, "ES learning rate")
    lr_decay: float | None = flag(None, "ES lr decays linearly to lr * lr_decay over the budget")
    optimizer: str | None = flag(None, "ES optax optimizer", OPTIMIZERS)
    hidden: str | None = flag(None, "hidden layer sizes, comma separated")
    activation: str | None = flag(None, "hidden activation", ACTIVATIONS)
    shaping: str | None = flag(None, "ES fitness shaping", [s for s in SHAPINGS if s != "group_z_score"])
    episodes: int | None = flag(None, "ES episodes per member per generation")
    max_steps: int | None = flag(None, "cap on the episode length (0: the env's own limit)")
    ppo_lr: float | None = flag(None, "PPO learning rate")
    num_envs: int | None = flag(None, "PPO parallel environments (a multiple of the device count, all processes)")
    rollout_len: int | None = flag(None, "PPO steps per environment per update")
    ppo_epochs: int | None = flag(None, "PPO epochs per update")
    minibatches: int | None = flag(None, "PPO minibatches per epoch")
    gamma: float | None = flag(None, "PPO discount")
    gae_lambda: float | None = flag(None, "PPO GAE lambda")
    clip_eps: float | None = flag(None, "PPO clip range")
    ent_coef: float | None = flag(None, "PPO entropy coefficient")
    vf_coef: float | None = flag(None, "PPO value-loss coefficient")
    max_grad_norm: float | None = flag(None, "PPO gradient clipping")
    grad_reduce: str | None = flag(None, "PPO on several devices: sum the gradients by all-gather + fixed-order add "
                                   "(gather: the same bits for any process layout) or XLA's all-reduce (psum)",
                                   ("gather", "psum"))
    anneal_lr: bool = flag(True, "PPO: anneal the learning rate linearly to 0 over the budget (as CleanRL)")
    clip_vloss: bool = flag(True, "PPO: clip the value loss around the rollout's values (as CleanRL)")
    obs_norm: bool | None = flag(None, "normalise observations by running mean / std (every method; checkpointed)")
    eval_episodes: int = flag(16, "episodes per evaluation")
    chunk: int = flag(0, "ES members per vmap chunk on each device (0: automatic, at most 1,024)")
    # the run fields' defaults for this recipe (each seed is one harness run in run_dir/seed<k>)
    generations: int = flag(0, "cap on the generations / PPO updates of a seed (0: none, the budgets stop it)")
    eval_every: int = flag(5, "evaluate the deterministic policy every k generations / updates")
    seed: int = flag(0, "first seed")
    time_limit: float = flag(0.0, "stop a seed after this many seconds of wall clock, set-up and evaluations "
                             "included (0: none); --resume continues it")
    run_dir: str = flag("", "run directory; empty: runs/rl-<env>-<strategy>")


def validate(cfg: Config, hp: dict) -> None:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"rl config: {msg}")

    harness.check_run_config(cfg)
    need(cfg.strategy in METHODS, f"strategy must be one of {METHODS}, got {cfg.strategy!r}")
    need(cfg.seeds >= 1, f"seeds must be >= 1, got {cfg.seeds}")
    need(cfg.budget_steps >= 1, f"budget_steps must be >= 1, got {cfg.budget_steps}")
    need(cfg.budget_wall_s >= 0, f"budget_wall_s must be >= 0, got {cfg.budget_wall_s}")
    need(cfg.eval_episodes >= 1, f"eval_episodes must be >= 1, got {cfg.eval_episodes}")
    need(hp["activation"] in ACTIVATIONS, f"activation must be one of {sorted(ACTIVATIONS)}")
    need(hp["optimizer"] in OPTIMIZERS, f"optimizer must be one of {sorted(OPTIMIZERS)}")
    need(hp["max_steps"] >= 0, f"max_steps must be >= 0, got {hp['max_steps']}")
    ppo = cfg.strategy == "ppo"
    foreign = [k for k in (ES_ONLY if ppo else PPO_ONLY) if getattr(cfg, k) is not None]
    foreign += ["chunk"] if ppo and cfg.chunk else []
    need(not foreign, f"{', '.join('--' + k.replace('_', '-') for k in foreign)} "
                      f"{'is' if len(foreign) == 1 else 'are'} not used by strategy {cfg.strategy} "
                      f"({'PPO sizes its batch with --num-envs and --rollout-len' if ppo else 'those are PPO settings'}); "
                      "drop them or pick the strategy they belong to")
    if ppo:
        E, T, M, n_dev = hp["num_envs"], hp["rollout_len"], hp["minibatches"], jax.device_count()
        need(E >= 1 and T >= 1 and M >= 1 and hp["ppo_epochs"] >= 1,
             "num_envs, rollout_len, minibatches and ppo_epochs must be >= 1")
        where = f" of all {jax.process_count()} processes" if jax.process_count() > 1 else ""
        need(E % n_dev == 0, f"num_envs {E} must be a multiple of the {n_dev} devices{where} (PPO splits its "
                             "environments)")
        need((E // n_dev * T) % M == 0, f"num_envs / devices * rollout_len ({E // n_dev * T}) must be divisible by "
                                        f"minibatches ({M})")
        need(hp["grad_reduce"] in ("gather", "psum"), f"grad_reduce must be gather or psum, got {hp['grad_reduce']!r}")
        return
    harness.check_population(hp["population"], cfg.chunk)  # every device of every process
    need(math.isfinite(hp["sigma"]) and hp["sigma"] > 0, f"sigma must be > 0, got {hp['sigma']}")
    need(math.isfinite(hp["lr"]) and hp["lr"] > 0, f"lr must be > 0, got {hp['lr']}")
    need(0 < hp["lr_decay"] <= 1, f"lr_decay must be in (0, 1], got {hp['lr_decay']}")
    need(hp["shaping"] in SHAPINGS and hp["shaping"] != "group_z_score", f"bad shaping {hp['shaping']!r}")
    need(hp["episodes"] >= 1, f"episodes must be >= 1, got {hp['episodes']}")
    need(hp["rank"] >= 1, f"rank must be >= 1, got {hp['rank']}")


class ESTrainState(NamedTuple):
    params: Any
    opt_state: Any
    es_state: Any
    rng: jax.Array
    obs_stats: Any  # rlt.ObsStats (unchanged unless obs_norm)
    progress: jax.Array  # rlt.progress_init(): the budget spent (the learning rate decays with it)


def make_es_trainer(env: rlt.Env, strategy: str, hp: dict, budget_steps: int, chunk: int = 0,
                    eval_episodes: int = 16) -> rlt.Trainer:
    sizes = rlt.policy_sizes(env, hp["hidden"])
    if strategy == "eggroll" and hp["rank"] > min(sizes):
        raise ValueError(f"rank {hp['rank']} exceeds the smallest weight-matrix dimension {min(sizes)} ({sizes})")
    es = make_strategy(strategy, hp["population"], hp["sigma"], hp["rank"], antithetic=True, shaping=hp["shaping"])
    optimizer = OPTIMIZERS[hp["optimizer"]](hp["lr"])  # the decay scales its updates (linear in the lr)
    act, norm = hp["activation"], bool(hp.get("obs_norm"))

    def generation(ts: ESTrainState, ctx):
        rng, k_gen = jax.random.split(ts.rng)
        out = rlt.population_rollouts(env, es, ctx, ts.es_state, ts.params, k_gen, episodes=hp["episodes"],
                                      activation=act, chunk=chunk or None, obs_stats=ts.obs_stats if norm else None,
                                      shift=ts.obs_stats.mean if norm else None)
        grad, es_state, metrics = es.tell(ctx, ts.es_state, out.ret)
        updates, opt_state = optimizer.update(grad, ts.opt_state, ts.params)
        scale = 1.0 - (1.0 - hp["lr_decay"]) * rlt.budget_fraction(ts.progress)
        if hp["lr_decay"] != 1.0:  # (no decay: the former program, bit for bit)
            updates = jax.tree_util.tree_map(lambda u: u * scale, updates)
        params = optax.apply_updates(ts.params, updates)
        steps = out.length.sum()
        obs_stats = (rlt.merge_obs_moments(ts.obs_stats, steps * env.num_agents, out.obs_sum.sum(0),
                                           out.obs_sq.sum(0)) if norm else ts.obs_stats)
        progress = rlt.spend(ts.progress, steps, budget_steps)
        metrics = {**metrics, "env_steps": steps, "lr": hp["lr"] * scale}
        return ESTrainState(params, opt_state, es_state, rng, obs_stats, progress), metrics

    def init_params(seed):
        params = init_mlp(jax.random.fold_in(jax.random.PRNGKey(seed), 0), sizes)
        return params, optimizer.init(params)

    place = distributed.replicate  # every array replicated over every device of every process
    gen_jit, init_jit = jax.jit(generation), jax.jit(init_params)
    eval_jit = jax.jit(lambda p, st, k: rlt.evaluate_policy(env, p, k, eval_episodes, act, st if norm else None))
    contexts: dict = {}  # seed -> its noise context (constant for the run; a jit argument, never in the state)
    measured: dict = {}
    n_params = sum(a * b + a for a, b in zip(sizes[1:], sizes[:-1]))

    def context(seed):
        if seed not in contexts:
            contexts.clear()
            contexts[seed] = place(es.setup(jax.random.fold_in(jax.random.PRNGKey(seed), 1), init_jit(seed)[0]))
        return contexts[seed]

    def init(seed):
        params, opt_state = init_jit(seed)
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), 2)
        return place(ESTrainState(params, opt_state, es.init(context(seed)), rng, rlt.obs_stats_init(env.obs_size),
                                  rlt.progress_init()))

    def communication(ts, ctx):
        if not measured:
            measured.update(distributed.communication(gen_jit, place(ts), ctx, n_params=n_params))
        return measured

    return rlt.Trainer(env, init, context, lambda ts, ctx: gen_jit(place(ts), ctx),
                       lambda ts, k: eval_jit(place(ts.params), place(ts.obs_stats), place(k)), lambda ts: ts.params,
                       n_params, communication)


def make_trainer(cfg: Config, hp: dict | None = None) -> rlt.Trainer:
    hp = hp or resolve(cfg)
    validate(cfg, hp)
    env = rlt.make_env(cfg.env, max_steps=hp["max_steps"] or None)
    if cfg.strategy == "ppo":
        from ..baselines.ppo import make_ppo_trainer
        return make_ppo_trainer(env, hp, cfg.eval_episodes, budget_steps=cfg.budget_steps)
    return make_es_trainer(env, cfg.strategy, hp, cfg.budget_steps, cfg.chunk, cfg.eval_episodes)


def warm_up(trainer: rlt.Trainer, seed: int = 0) -> float:
    """Compile init / step / evaluate once (a throwaway generation) and measure the communication;
    returns the seconds spent."""
    t0 = time.perf_counter()
    state, ctx = trainer.init(seed), trainer.context(seed)
    jax.block_until_ready(trainer.evaluate(state, jax.random.PRNGKey(0)))
    if trainer.communication:
        trainer.communication(state, ctx)
    # two steps: a step's output state can differ from init's in weak types / shardings, which
    # would make the second call compile again (inside the first seed's timed budget)
    for _ in range(2):
        state, m = trainer.step(state, ctx)
        jax.block_until_ready(m)
    return time.perf_counter() - t0


def run_root(cfg: Config) -> Path:
    return Path(cfg.run_dir or f"runs/rl-{cfg.env.replace('/', '_').replace(':', '_')}-{cfg.strategy}")


def seed_config(cfg: Config, seed: int, hp: dict | None = None) -> Config:
    """One seed's harness config: its seed, run_dir/seed<k>, and a generation cap the step
    budget reaches first (an episode is at least one step) unless `generations` is set."""
    hp = hp or resolve(cfg)
    per_gen = hp["num_envs"] * hp["rollout_len"] if cfg.strategy == "ppo" else hp["population"] * hp["episodes"]
    cap = cfg.generations or -(-cfg.budget_steps // per_gen)
    return dataclasses.replace(cfg, seed=seed, run_dir=str(run_root(cfg) / f"seed{seed}"), generations=cap)


def timed_step(cfg: Config, trainer: rlt.Trainer, ctx):
    """trainer.step, adding the generation's wall clock to the state's budget progress when a
    wall-clock budget is set (every process adds the same number: the largest of theirs)."""
    def step(state, gen):
        t = time.perf_counter()
        state, metrics = trainer.step(state, ctx)
        if not cfg.budget_wall_s:
            return state, metrics
        jax.block_until_ready(metrics)
        dt = float(distributed.allgather_host(np.asarray([time.perf_counter() - t], np.float64)).max())
        return state._replace(progress=rlt.spend_time(state.progress, dt / cfg.budget_wall_s)), metrics

    return step


def over_budget(cfg: Config, record: dict) -> bool:
    """The step budget is spent, or the training wall clock (evaluations excluded) is."""
    return record["env_steps"] >= cfg.budget_steps or bool(cfg.budget_wall_s and record["train_s"] >= cfg.budget_wall_s)


def make_train(cfg: Config, trainer: rlt.Trainer | None = None) -> harness.Train:
    """One seed (`seed_config(cfg, k)`) as a harness run. Pass the `trainer` (make_trainer) the
    seeds share, so they compile once."""
    hp = resolve(cfg)
    validate(cfg, hp)
    trainer = trainer or make_trainer(cfg, hp)
    seed, label = cfg.seed, f"{cfg.env} {cfg.strategy} seed {cfg.seed}"
    ctx = trainer.context(seed)
    eval_key = jax.random.fold_in(jax.random.PRNGKey(seed), 10**6)

    def evaluate(state, gen):
        returns = trainer.evaluate(state, jax.random.fold_in(eval_key, gen))
        return {"eval_return": float(np.mean(jax.device_get(returns)))}

    return harness.Train(
        name=label, init=lambda: trainer.init(seed), step=timed_step(cfg, trainer, ctx), evaluate=evaluate,
        trajectory=PPO_TRAJECTORY if cfg.strategy == "ppo" else ES_TRAJECTORY,
        title=f"{cfg.env}, {cfg.strategy}, seed {seed}", plot_keys=[("eval_return",), ("fitness_mean", "train_return")],
        postfix_keys=["eval_return", "env_steps"], totals=("env_steps",), stop=lambda r: over_budget(cfg, r),
        summary=lambda s, r: {"seed": seed, "final_return": r["eval_return"], "env": trainer.env.name,
                              "strategy": cfg.strategy},
        communication=(lambda s: trainer.communication(s, ctx)) if trainer.communication else None,
        canonical=canonical(cfg))


def finished(cfg: Config) -> dict | None:
    """With --resume, for one seed's config: refuse a checkpoint whose config differs in a field
    that changes training (before anything compiles), and return the seed's result if its run
    is complete (budget spent or generation cap reached: the harness would train no further),
    else None. Every process must call it; they get the same answer."""
    directory = Path(cfg.run_dir) / "checkpoint"
    if not cfg.resume or not distributed.checkpoint_exists(directory):
        return None
    meta = harness.checked_metadata(cfg, directory, PPO_TRAJECTORY if cfg.strategy == "ppo" else ES_TRAJECTORY,
                                    canonical(cfg))
    try:
        result = json.loads((Path(cfg.run_dir) / "result.json").read_text())
        done = meta.get("generation") == result["generations"] and (
            result["generations"] >= cfg.generations or over_budget(cfg, result))
    except (OSError, ValueError, KeyError):
        done = False
    flags = distributed.allgather_host(np.asarray([done], np.int32)).reshape(-1)
    if flags.any() and not flags.all():
        raise FileNotFoundError(f"{cfg.run_dir} is finished on some processes but not on others: use a shared "
                                "filesystem or copy the run directory to every machine before --resume")
    return result if done else None


def train_seed(scfg: Config, trainer: rlt.Trainer, result: dict | None) -> dict:
    """Train one seed (or continue it; `result`: it is finished, skip it); its summary."""
    if result is not None:
        distributed.say(f"[{scfg.env} {scfg.strategy}] --resume: seed {scfg.seed} is finished, skipping it")
    else:
        if not scfg.resume and distributed.is_main_process():  # a stale result must not pass for this run's
            (Path(scfg.run_dir) / "result.json").unlink(missing_ok=True)
        result = harness.run(scfg, lambda c: make_train(c, trainer))
    keep = ("seed", "final_return", "generations", "env_steps", "stopped", "communication")
    return {**{k: result[k] for k in keep}, "wall_s": result["train_s"], "eval_s": result["eval_s"]}


def run(cfg: Config) -> dict:
    """Train `seeds` seeds; returns the summary (also run_dir/result.json)."""
    hp = resolve(cfg)
    validate(cfg, hp)
    root = run_root(cfg)
    t0 = time.perf_counter()
    seeds = [seed_config(cfg, cfg.seed + i, hp) for i in range(cfg.seeds)]
    done = [finished(scfg) for scfg in seeds]  # --resume: config checks first, finished seeds skipped
    trainer = make_trainer(cfg, hp)
    compile_s = time.perf_counter() - t0 + (warm_up(trainer, cfg.seed) if None in done else 0.0)
    if distributed.is_main_process():
        write_json(root / "config.json", {**dataclasses.asdict(cfg), "resolved": hp})
    per_seed = [train_seed(scfg, trainer, result) for scfg, result in zip(seeds, done)]
    finals = [r["final_return"] for r in per_seed]
    result = {"env": trainer.env.name, "strategy": cfg.strategy, "mean_return": float(np.mean(finals)),
              "stderr": rlt.stderr(finals), "wall_s": round(float(np.mean([r["wall_s"] for r in per_seed])), 3),
              "env_steps": int(np.mean([r["env_steps"] for r in per_seed])), "seeds": cfg.seeds,
              "compile_s": round(compile_s, 3), "num_params": trainer.num_params, "suite": trainer.env.suite,
              "per_seed": [{k: v for k, v in r.items() if k != "communication"} for r in per_seed],
              "communication": per_seed[0]["communication"], "processes": jax.process_count(),
              "devices": jax.device_count(), "run_dir": str(root)}
    if distributed.is_main_process():
        write_json(root / "result.json", result)
    return result
