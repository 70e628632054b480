"""RL on any supported JAX environment: EGGROLL, full-rank OpenES or PPO, over several seeds.

    eggroll train rl --env CartPole-v1 --strategy eggroll --seeds 3 --budget-steps 500000
    eggroll train rl --env MPE_simple_spread_v3 --strategy open_es      # paper preset (see PRESETS)
    eggroll train rl --env brax/hopper --strategy ppo --budget-wall-s 300
    eggroll train rl --env my_pkg.envs:make_my_env                       # your own environment

Environments come from eggroll.tasks.rl.make_env (gymnax, brax, jumanji, navix, craftax, kinetix,
jaxmarl MPE, or a "module:function" factory returning an Env). The policy is an MLP
(models/mlp.py) over the env's flat observation; MPE agents share it (agent id in the obs).

ES (eggroll / open_es): one jitted call per generation. Every member plays `episodes` episodes
with the deterministic policy of params + sigma * E_m; all members play the same start states
(common random numbers); fitness = mean return; es.tell -> optax (adam / adamw / sgd) with the
learning rate decayed linearly to lr * lr_decay over the generations the budget allows.
PPO: eggroll.baselines.ppo on the same adapters and the same MLP sizes.

Each seed trains until `budget_steps` env steps (or `budget_wall_s` seconds, if set) are spent;
every `eval_every` generations the deterministic unperturbed policy plays `eval_episodes` fresh
episodes (eval_return). One compile serves all seeds (the seed is an argument, not a constant).
Files: run_dir/seed<k>/{metrics.jsonl, curve.png, result.json, checkpoint/}, run_dir/config.json,
run_dir/result.json. The final JSON: env, strategy, mean_return (mean over seeds of the final
eval return), stderr (over seeds), wall_s (mean per seed of the training wall clock: set-up and
compilation are done once before the seeds and reported as compile_s; evaluations are excluded),
env_steps (mean per seed), plus per-seed details. Hyperparameters: flags > PRESETS[env] > DEFAULTS.
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
import optax

from .. import distributed
from ..checkpoint import save_checkpoint
from ..models.mlp import ACTIVATIONS, init_mlp
from ..runlog import RunLog, write_json
from ..shaping import SHAPINGS
from ..strategy import make_strategy
from ..tasks import rl as rlt
from ..cli import flag

METHODS = ("eggroll", "open_es", "ppo")
OPTIMIZERS: dict[str, Callable] = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd}

# Hyperparameters every run starts from (flags and presets override them).
DEFAULTS: dict[str, Any] = {
    "population": 64, "sigma": 0.1, "rank": 1, "lr": 0.02, "lr_decay": 1.0, "optimizer": "adam", "hidden": "256,256,256",
    "activation": "tanh", "shaping": "centered_rank", "episodes": 1, "max_steps": 0,
    # PPO
    "ppo_lr": 3e-4, "num_envs": 16, "rollout_len": 128, "ppo_epochs": 4, "minibatches": 4, "gamma": 0.99, "gae_lambda": 0.95,
    "clip_eps": 0.2, "ent_coef": 0.01, "vf_coef": 0.5, "max_grad_norm": 0.5,
}

# Per-environment presets. "es" applies to eggroll and open_es, "ppo" to PPO. MPE values are the
# paper's appendix choices for EGGROLL (3x64, lr 0.01, AdamW, rank 1; "no rank transform" -> z_score)
# and its IPPO baseline (lr 1e-3, 4 epochs, 4 minibatches, entropy 0.01). The others are hand-set
# for a small CPU budget (not from the paper; `eggroll tune` searches them).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "MPE_simple_spread_v3": {
        "es": {"activation": "tanh", "lr": 0.01, "lr_decay": 0.7, "hidden": "64,64,64", "population": 128,
                   "optimizer": "adamw", "rank": 1, "sigma": 0.5, "shaping": "z_score"},
        "ppo": {"hidden": "64,64,64", "ppo_lr": 1e-3, "ppo_epochs": 4, "minibatches": 4, "ent_coef": 0.01}},
    "MPE_simple_speaker_listener_v4": {
        "es": {"activation": "tanh", "lr": 0.01, "lr_decay": 0.7, "hidden": "64,64,64", "population": 512,
                   "optimizer": "adamw", "rank": 1, "sigma": 0.5, "shaping": "centered_rank"},
        "ppo": {"hidden": "64,64,64", "ppo_lr": 1e-3, "ppo_epochs": 4, "minibatches": 4, "ent_coef": 0.01}},
    "MPE_simple_reference_v3": {
        "es": {"activation": "pqn", "lr": 0.01, "lr_decay": 0.3, "hidden": "64,64,64", "population": 4096,
                   "optimizer": "adamw", "rank": 1, "sigma": 0.1, "shaping": "z_score"},
        "ppo": {"hidden": "64,64,64", "ppo_lr": 1e-3, "ppo_epochs": 4, "minibatches": 4, "ent_coef": 0.01}},
    "CartPole-v1": {"es": {"sigma": 0.1, "lr": 0.05}, "ppo": {"ppo_lr": 3e-4}},
    "Pendulum-v1": {"es": {"sigma": 0.1, "lr": 0.02, "max_steps": 200}, "ppo": {"ppo_lr": 1e-3, "ent_coef": 0.0}},
    "Acrobot-v1": {"es": {"sigma": 0.1, "lr": 0.05}},
    "brax/inverted_double_pendulum": {"es": {"sigma": 0.05, "lr": 0.02}, "ppo": {"ent_coef": 0.0}},
    "brax/hopper": {"es": {"sigma": 0.05, "lr": 0.02}, "ppo": {"ent_coef": 0.0}},
    "Game2048-v1": {"es": {"sigma": 0.1, "lr": 0.02, "max_steps": 500}},
    "Navix-DoorKey-5x5-v0": {"es": {"sigma": 0.1, "lr": 0.02}},
    "Navix-DoorKey-8x8-v0": {"es": {"sigma": 0.1, "lr": 0.02}},
    "Craftax-Classic-Symbolic-v1": {"es": {"sigma": 0.05, "lr": 0.02, "max_steps": 500}},
    "Craftax-Symbolic-v1": {"es": {"sigma": 0.05, "lr": 0.02, "max_steps": 500}},
}


_arg = flag  # Config field -> CLI flag (eggroll.cli.flag)


@dataclass
class Config:
    env: str = _arg("CartPole-v1", "environment name (see eggroll.tasks.rl) or module:function")
    strategy: str = _arg("eggroll", "training method", METHODS)
    seeds: int = _arg(1, "number of seeds (seed, seed+1, ...)")
    seed: int = _arg(0, "first seed")
    budget_steps: int = _arg(200_000, "env steps per seed")
    budget_wall_s: float = _arg(0.0, "wall-clock seconds per seed (0: no limit)")
    population: int | None = _arg(None, "ES population (even; multiple of the device count)")
    sigma: float | None = _arg(None, "ES noise scale")
    rank: int | None = _arg(None, "EGGROLL rank")
    lr: float | None = _arg(None, "ES learning rate")
    lr_decay: float | None = _arg(None, "ES lr decays linearly to lr * lr_decay over the budget")
    optimizer: str | None = _arg(None, "ES optax optimizer", OPTIMIZERS)
    hidden: str | None = _arg(None, "hidden layer sizes, comma separated")
    activation: str | None = _arg(None, "hidden activation", ACTIVATIONS)
    shaping: str | None = _arg(None, "ES fitness shaping", [s for s in SHAPINGS if s != "group_z_score"])
    episodes: int | None = _arg(None, "ES episodes per member per generation")
    max_steps: int | None = _arg(None, "cap on the episode length (0: the env's own limit)")
    ppo_lr: float | None = _arg(None, "PPO learning rate")
    num_envs: int | None = _arg(None, "PPO parallel environments")
    rollout_len: int | None = _arg(None, "PPO steps per environment per update")
    ppo_epochs: int | None = _arg(None, "PPO epochs per update")
    minibatches: int | None = _arg(None, "PPO minibatches per epoch")
    gamma: float | None = _arg(None, "PPO discount")
    gae_lambda: float | None = _arg(None, "PPO GAE lambda")
    clip_eps: float | None = _arg(None, "PPO clip range")
    ent_coef: float | None = _arg(None, "PPO entropy coefficient")
    vf_coef: float | None = _arg(None, "PPO value-loss coefficient")
    max_grad_norm: float | None = _arg(None, "PPO gradient clipping")
    eval_every: int = _arg(5, "evaluate the deterministic policy every k generations / updates")
    eval_episodes: int = _arg(16, "episodes per evaluation")
    chunk: int = _arg(0, "ES members per vmap chunk on each device (0: all)")
    run_dir: str = _arg("", "run directory; empty: runs/rl-<env>-<strategy>")
    progress: bool = _arg(True, "progress bar on stderr (shown only in a terminal)")


def resolve(cfg: Config) -> dict:
    """Hyperparameters for this run: flags > PRESETS[env][es|ppo] > DEFAULTS."""
    preset = PRESETS.get(preset_key(cfg.env), {}).get("ppo" if cfg.strategy == "ppo" else "es", {})
    hp = {**DEFAULTS, **preset}
    hp.update({k: v for k, v in dataclasses.asdict(cfg).items() if k in DEFAULTS and v is not None})
    hp["hidden"] = hidden_sizes(hp["hidden"])
    return hp


def preset_key(name: str) -> str:
    """The PRESETS key of an env name: 'mpe/simple_spread_v3' -> 'MPE_simple_spread_v3', 'hopper' -> 'brax/hopper'."""
    if ":" in name:
        return name
    suite, inner = rlt.suite_of(name)
    if suite == "mpe":
        return inner if inner.startswith("MPE_") else f"MPE_{inner}"
    return f"{suite}/{inner}" if suite in ("brax", "kinetix") else inner


def hidden_sizes(hidden) -> tuple[int, ...]:
    if isinstance(hidden, int):
        return (hidden,)
    if isinstance(hidden, str):
        try:
            hidden = tuple(int(p) for p in hidden.replace(" ", ",").split(",") if p.strip())
        except ValueError:
            raise ValueError(f"hidden must be comma-separated positive integers, got {hidden!r}") from None
    hidden = tuple(int(h) for h in hidden)
    if not hidden or min(hidden) < 1:
        raise ValueError(f"hidden must be one or more positive integers, got {hidden!r}")
    return hidden


def validate(cfg: Config, hp: dict) -> None:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"rl config: {msg}")

    need(cfg.strategy in METHODS, f"strategy must be one of {METHODS}, got {cfg.strategy!r}")
    need(cfg.seeds >= 1, f"seeds must be >= 1, got {cfg.seeds}")
    need(cfg.budget_steps >= 1, f"budget_steps must be >= 1, got {cfg.budget_steps}")
    need(cfg.budget_wall_s >= 0, f"budget_wall_s must be >= 0, got {cfg.budget_wall_s}")
    need(cfg.eval_every >= 1 and cfg.eval_episodes >= 1, "eval_every and eval_episodes must be >= 1")
    need(hp["activation"] in ACTIVATIONS, f"activation must be one of {sorted(ACTIVATIONS)}")
    need(hp["optimizer"] in OPTIMIZERS, f"optimizer must be one of {sorted(OPTIMIZERS)}")
    need(hp["max_steps"] >= 0, f"max_steps must be >= 0, got {hp['max_steps']}")
    if cfg.strategy == "ppo":
        need(hp["num_envs"] >= 1 and hp["rollout_len"] >= 1, "num_envs and rollout_len must be >= 1")
        need((hp["num_envs"] * hp["rollout_len"]) % hp["minibatches"] == 0,
             f"num_envs * rollout_len ({hp['num_envs'] * hp['rollout_len']}) must be divisible by "
             f"minibatches ({hp['minibatches']})")
        return
    pop, n_dev = hp["population"], jax.device_count()  # every device of every process
    need(pop >= 2 and pop % 2 == 0, f"population must be an even integer >= 2 (antithetic pairs), got {pop}")
    need(pop % n_dev == 0, f"population {pop} must be a multiple of the {n_dev} devices")
    need(cfg.chunk == 0 or (pop // n_dev) % cfg.chunk == 0,
         f"chunk {cfg.chunk} must be 0 or divide the per-device population {pop // n_dev}")
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


def make_es_trainer(env: rlt.Env, strategy: str, hp: dict, budget_steps: int, chunk: int = 0,
                    eval_episodes: int = 16) -> rlt.Trainer:
    sizes = rlt.policy_sizes(env, hp["hidden"])
    if strategy == "eggroll" and hp["rank"] > min(sizes):
        raise ValueError(f"rank {hp['rank']} exceeds the smallest weight-matrix dimension {min(sizes)} ({sizes})")
    kw = {"antithetic": True, "shaping": hp["shaping"]}
    es = make_strategy(strategy, hp["population"], hp["sigma"], hp["rank"], **kw)
    context: dict = {}  # this seed's noise context (constant for the run): made by init, never in the state
    # lr decays linearly to lr * lr_decay over the generations a budget of full-length episodes allows
    gens = max(1, budget_steps // (hp["population"] * hp["episodes"] * env.horizon))
    sched = optax.linear_schedule(hp["lr"], hp["lr"] * hp["lr_decay"], gens)
    optimizer = OPTIMIZERS[hp["optimizer"]](sched)
    act = hp["activation"]

    def generation(ts: ESTrainState, ctx):
        rng, k_gen = jax.random.split(ts.rng)
        fitness, steps = rlt.population_fitness(env, es, ctx, ts.es_state, ts.params, k_gen, episodes=hp["episodes"],
                                                activation=act, chunk=chunk or None)
        grad, es_state, metrics = es.tell(ctx, ts.es_state, fitness)
        updates, opt_state = optimizer.update(grad, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        metrics = {**metrics, "env_steps": steps.sum()}
        return ESTrainState(params, opt_state, es_state, rng), metrics

    def init_params(seed):
        key = jax.random.PRNGKey(seed)
        params = init_mlp(jax.random.fold_in(key, 0), sizes)
        return params, optimizer.init(params)

    place = distributed.replicate  # every array replicated over every device of every process
    gen_jit, init_jit = jax.jit(generation), jax.jit(init_params)
    eval_jit = jax.jit(lambda p, k: rlt.evaluate_policy(env, p, k, eval_episodes, act))

    def init(seed):
        params, opt_state = init_jit(seed)
        key = jax.random.PRNGKey(seed)
        context["ctx"] = place(es.setup(jax.random.fold_in(key, 1), params))
        return place(ESTrainState(params, opt_state, es.init(context["ctx"]), jax.random.fold_in(key, 2)))

    def step(ts):
        return gen_jit(place(ts), context["ctx"])

    n_params = sum(a * b + a for a, b in zip(sizes[1:], sizes[:-1]))
    return rlt.Trainer(env, init, step, lambda ts, k: eval_jit(place(ts.params), k), lambda ts: ts.params, n_params)


def make_trainer(cfg: Config, hp: dict | None = None) -> rlt.Trainer:
    hp = hp or resolve(cfg)
    validate(cfg, hp)
    env = rlt.make_env(cfg.env, max_steps=hp["max_steps"] or None)
    if cfg.strategy == "ppo":
        from ..baselines.ppo import make_ppo_trainer
        return make_ppo_trainer(env, hp, cfg.eval_episodes)
    return make_es_trainer(env, cfg.strategy, hp, cfg.budget_steps, cfg.chunk, cfg.eval_episodes)


def warm_up(trainer: rlt.Trainer, seed: int = 0) -> float:
    """Compile init / step / evaluate once (a throwaway generation); returns the seconds spent."""
    t0 = time.perf_counter()
    state = trainer.init(seed)
    jax.block_until_ready(trainer.evaluate(state, jax.random.PRNGKey(0)))
    # two steps: a step's output state can differ from init's in weak types / shardings, which
    # would make the second call compile again (inside the first seed's timed budget)
    for _ in range(2):
        state, m = trainer.step(state)
    jax.block_until_ready(m)
    return time.perf_counter() - t0


def train_seed(trainer: rlt.Trainer, cfg: Config, seed: int, run_dir: Path, on_eval: Callable | None = None) -> dict:
    """Train one seed until the budget is spent. metrics.jsonl holds eval_return against env_steps
    and train_s (training wall clock: evaluations excluded; call warm_up first so compilation is too)."""
    eval_key = jax.random.fold_in(jax.random.PRNGKey(seed), 10**6)
    log = RunLog(run_dir, total=None, plot_keys=[("eval_return",), ("fitness_mean", "train_return")],
                 postfix_keys=["eval_return", "env_steps"], progress=None if cfg.progress else False,
                 desc=f"{cfg.env} {cfg.strategy} seed {seed}", title=f"{cfg.env}, {cfg.strategy}, seed {seed}")
    state = trainer.init(seed)
    gen, env_steps, eval_s = 0, 0, 0.0

    def evaluate():
        nonlocal eval_s
        t = time.perf_counter()
        r = float(np.mean(jax.device_get(trainer.evaluate(state, jax.random.fold_in(eval_key, gen)))))
        eval_s += time.perf_counter() - t
        if on_eval is not None:
            on_eval(r)
        return r

    def out_of_budget():
        return env_steps >= cfg.budget_steps or bool(cfg.budget_wall_s and log.elapsed - eval_s >= cfg.budget_wall_s)

    ret = evaluate()
    log.log(0, {"eval_return": ret, "env_steps": 0, "train_s": 0.0})
    try:
        while not out_of_budget():
            state, m = trainer.step(state)
            gen += 1
            m = jax.device_get(m)
            env_steps += int(m.pop("env_steps"))
            rec = {k: float(v) for k, v in m.items()}
            rec.update(env_steps=env_steps, train_s=round(log.elapsed - eval_s, 4))
            if gen % cfg.eval_every == 0 or out_of_budget():
                ret = evaluate()
                rec["eval_return"] = ret
            log.log(gen, rec)
        result = {"seed": seed, "final_return": ret, "generations": gen, "env_steps": env_steps,
                  "wall_s": round(log.elapsed - eval_s, 3), "eval_s": round(eval_s, 3)}
        save_checkpoint(run_dir / "checkpoint", trainer.params(state), {**result, "env": cfg.env})
        log.write_json("result", result)
    finally:
        log.close()
    return result


def run(cfg: Config) -> dict:
    """Train `seeds` seeds; returns the summary (also run_dir/result.json)."""
    hp = resolve(cfg)
    validate(cfg, hp)
    run_dir = Path(cfg.run_dir or f"runs/rl-{cfg.env.replace('/', '_').replace(':', '_')}-{cfg.strategy}")
    t0 = time.perf_counter()
    trainer = make_trainer(cfg, hp)
    compile_s = time.perf_counter() - t0 + warm_up(trainer, cfg.seed)
    write_json(run_dir / "config.json", {**dataclasses.asdict(cfg), "resolved": hp})
    per_seed = [train_seed(trainer, cfg, cfg.seed + i, run_dir / f"seed{cfg.seed + i}") for i in range(cfg.seeds)]
    finals = [r["final_return"] for r in per_seed]
    result = {"env": trainer.env.name, "strategy": cfg.strategy, "mean_return": float(np.mean(finals)),
              "stderr": rlt.stderr(finals), "wall_s": round(float(np.mean([r["wall_s"] for r in per_seed])), 3),
              "env_steps": int(np.mean([r["env_steps"] for r in per_seed])), "seeds": cfg.seeds,
              "compile_s": round(compile_s, 3), "num_params": trainer.num_params, "suite": trainer.env.suite, "per_seed": per_seed,
              "run_dir": str(run_dir)}
    write_json(run_dir / "result.json", result)
    return result
