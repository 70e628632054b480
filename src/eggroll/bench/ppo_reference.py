"""PPO calibration: our PPO (eggroll.baselines.ppo through the `rl` recipe) against rejax's PPO,
a maintained JAX implementation from the index, at equal env steps and equal hyperparameters.

    pip install "eggroll-jax[rl-reference]"
    eggroll bench ppo-reference --envs CartPole-v1,Acrobot-v1,Pendulum-v1 --seeds 3 --budget-steps 200000

Both get each env's resolved PPO settings (eggroll.recipes.rl_presets: parallel envs, rollout
length, epochs, minibatches, lr, gamma, GAE lambda, clip, entropy and value coefficients,
gradient clipping, the MLP's sizes and activation) and the same env steps. rejax keeps its
learning rate constant, so ours runs with --no-anneal-lr here; both clip the value loss; neither
normalises observations or rewards. Each final policy is evaluated the same way: its
deterministic action (the most likely discrete action, the Gaussian's mean) for `eval_episodes`
episodes on the gymnax env. What is not the same: rejax builds its own flax networks (its
initialisation) and squashes continuous actions by clipping; ours by tanh. gymnax environments
only (rejax takes a gymnax env object).

Output: one JSON line per (env, implementation) as it finishes, then the summary: per env both
mean +- stderr over seeds and "within": |ours - rejax| <= their combined standard error, or
ours higher.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..config import flag
from ..recipes import rl as recipe
from ..recipes.rl_presets import resolve
from ..tasks import rl as rlt


@dataclass
class Config:
    envs: str = flag("CartPole-v1,Acrobot-v1,Pendulum-v1", "comma-separated gymnax environments")
    seeds: int = flag(3, "seeds per (env, implementation)")
    budget_steps: int = flag(200_000, "env steps per seed (both implementations)")
    eval_episodes: int = flag(32, "deterministic evaluation episodes of each final policy")
    out_dir: str = flag("runs/bench-ppo-reference", "run directories of our PPO")


def rejax_config(hp: dict, env: str, budget_steps: int) -> dict:
    """Our resolved PPO hyperparameters in rejax.PPO.create's terms."""
    return {"env": env, "num_envs": hp["num_envs"], "num_steps": hp["rollout_len"], "num_epochs": hp["ppo_epochs"],
            "num_minibatches": hp["minibatches"], "learning_rate": hp["ppo_lr"], "gamma": hp["gamma"],
            "gae_lambda": hp["gae_lambda"], "clip_eps": hp["clip_eps"], "ent_coef": hp["ent_coef"],
            "vf_coef": hp["vf_coef"], "max_grad_norm": hp["max_grad_norm"], "total_timesteps": budget_steps,
            "eval_freq": budget_steps, "skip_initial_evaluation": True,
            "agent_kwargs": {"activation": hp["activation"], "hidden_layer_sizes": tuple(hp["hidden"])}}


class _DoneEnv:
    """A gymnax >= 1.0 env whose `step` returns rejax 0.1.3's five values (obs, state, reward,
    done, info), done = terminated or truncated (gymnax 1.0 returns the two separately: six)."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):  # only for names not found on the wrapper (rejax deep-copies it)
        if name == "_env":
            raise AttributeError(name)
        return getattr(self._env, name)

    def step(self, key, state, action, params=None):
        obs, state, reward, terminated, truncated, info = self._env.step(key, state, action, params)
        return obs, state, reward, jnp.logical_or(terminated, truncated), info


def run_rejax(conf: dict, seed: int, episodes: int) -> float:
    """Train rejax's PPO for conf's steps; the mean return of its deterministic policy."""
    try:
        import gymnax
        from rejax import PPO
        from rejax.evaluate import evaluate
    except ImportError:
        raise ModuleNotFoundError('bench ppo-reference needs rejax: pip install "eggroll-jax[rl-reference]"') from None
    env, env_params = gymnax.make(conf["env"])
    algo = PPO.create(**{**conf, "env": _DoneEnv(env), "env_params": env_params})
    ts, _ = jax.jit(algo.train)(jax.random.PRNGKey(seed))

    def act(obs, rng):  # the deterministic action: the mode (discrete) or the mean (Gaussian)
        dist = algo.actor.apply(ts.actor_ts.params, obs[None], method="_action_dist")
        a = dist.mode() if algo.discrete else dist.mean()
        if not algo.discrete:
            space = algo.action_space
            a = jnp.clip(a, space.low, space.high)
        return a[0]

    _, returns = evaluate(act, jax.random.PRNGKey(10_000 + seed), algo.env, algo.env_params, episodes,
                          algo.env_params.max_steps_in_episode)
    return float(jnp.mean(returns))


def _summary(vals: list[float]) -> dict:
    return {"mean": float(np.mean(vals)), "stderr": rlt.stderr(vals), "per_seed": vals}


def run(cfg: Config) -> dict:
    envs = [e.strip() for e in cfg.envs.split(",") if e.strip()]
    bad = [e for e in envs if rlt.suite_of(e)[0] != "gymnax"]
    if not envs or bad or cfg.seeds < 1 or cfg.budget_steps < 1:
        raise ValueError(f"need gymnax envs (rejax takes a gymnax env), seeds >= 1, budget_steps >= 1; got envs {envs}, "
                         f"non-gymnax {bad}, seeds {cfg.seeds}, budget_steps {cfg.budget_steps}")
    rows, t0 = {}, time.perf_counter()
    for env in envs:
        rc = recipe.Config(env=env, strategy="ppo", seeds=cfg.seeds, budget_steps=cfg.budget_steps, anneal_lr=False,
                           eval_episodes=cfg.eval_episodes, eval_every=10**6, progress=False,
                           run_dir=f"{cfg.out_dir}/{env}")
        hp = resolve(rc)
        ours = recipe.run(rc)
        conf = rejax_config(hp, env, cfg.budget_steps)
        ref = [run_rejax(conf, rc.seed + i, cfg.eval_episodes) for i in range(cfg.seeds)]  # rejax deep-copies it
        a, b = _summary([s["final_return"] for s in ours["per_seed"]]), _summary(ref)
        within = a["mean"] >= b["mean"] - math.hypot(a["stderr"], b["stderr"])
        rows[env] = {"ours": a, "rejax": b, "within": bool(within), "env_steps_ours": ours["env_steps"],
                     "hyperparameters": {k: v for k, v in conf.items() if k != "env"}}
        print(json.dumps({"env": env, "ours": round(a["mean"], 2), "rejax": round(b["mean"], 2), "within": bool(within),
                          "elapsed_s": round(time.perf_counter() - t0, 1)}), flush=True)
    return {"bench": "ppo-reference", "budget_steps": cfg.budget_steps, "seeds": cfg.seeds, "rows": rows,
            "within": sum(r["within"] for r in rows.values()), "envs": len(rows),
            "wall_s": round(time.perf_counter() - t0, 1)}
