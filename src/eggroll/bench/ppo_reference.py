"""PPO calibration: our PPO (eggroll.baselines.ppo through the `rl` recipe) against a maintained
JAX implementation from the index -- rejax's PPO on gymnax environments, brax's own PPO
(brax.training.agents.ppo) on brax ones -- at equal env steps and equal hyperparameters.

    pip install "eggroll-jax[rl-reference]"       # rejax; brax comes with the [rl] extra
    eggroll bench ppo-reference --envs CartPole-v1,Acrobot-v1,Pendulum-v1 --seeds 3 --budget-steps 200000
    eggroll bench ppo-reference --envs Pendulum-v1,brax/inverted_pendulum --budget-steps 1000000

Both get each env's resolved PPO settings (eggroll.recipes.rl_presets: parallel envs, rollout
length, epochs, minibatches, lr, gamma, GAE lambda, clip, entropy and value coefficients,
gradient clipping, the MLP's sizes and activation) and the same env steps. rejax keeps its
learning rate constant, so ours runs with --no-anneal-lr here; both clip the value loss; neither
normalises observations or rewards. Each final policy is evaluated the same way: its
deterministic action (the most likely discrete action, the Gaussian's mean) for `eval_episodes`
episodes on the gymnax env. What is not the same: rejax builds its own flax networks (its
initialisation) and squashes continuous actions by clipping; ours by tanh.

brax: the same env object (positional backend, 1,000-step episodes); one unroll of rollout_len
steps per env per update (brax's batch_size x num_minibatches = num_envs unrolls), split into
`minibatches` minibatches, ppo_epochs passes, constant learning rate, value loss clipped at
clip_eps when ours clips it, observations normalised when --obs-norm is on in ours (the env's
preset); policy and value MLPs of our sizes and activation. Its final policy is scored by brax's
own deterministic evaluator on `eval_episodes` envs. Not the same: brax's tanh-squashed Gaussian
(ours: a Gaussian around tanh(actor), clipped), its LeCun initialisation, its advantage
normalisation over the whole batch and no gradient-norm clipping unless max_grad_norm is given
(it is: ours).

Output: one JSON line per env as it finishes, then the summary: per env both mean +- stderr
over seeds ("reference" names the implementation) and "within": |ours - reference| <= their
combined standard error, or ours higher.
"""

from __future__ import annotations

import functools
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


def brax_config(hp: dict, budget_steps: int, episodes: int, horizon: int = 1000) -> dict:
    """Our resolved PPO hyperparameters in brax.training.agents.ppo.train's terms."""
    if hp["num_envs"] % hp["minibatches"]:
        raise ValueError(f"brax PPO needs num_envs ({hp['num_envs']}) divisible by minibatches ({hp['minibatches']})")
    return {"num_timesteps": budget_steps, "num_envs": hp["num_envs"], "episode_length": horizon,
            "unroll_length": hp["rollout_len"], "batch_size": hp["num_envs"] // hp["minibatches"],
            "num_minibatches": hp["minibatches"], "num_updates_per_batch": hp["ppo_epochs"],
            "learning_rate": hp["ppo_lr"], "entropy_cost": hp["ent_coef"], "discounting": hp["gamma"],
            "gae_lambda": hp["gae_lambda"], "clipping_epsilon": hp["clip_eps"], "vf_loss_coefficient": hp["vf_coef"],
            "clipping_epsilon_value": hp["clip_eps"] if hp["clip_vloss"] else None,
            "max_grad_norm": hp["max_grad_norm"], "normalize_observations": bool(hp["obs_norm"]),
            "num_evals": 2, "num_eval_envs": episodes, "deterministic_eval": True}


def run_brax(name: str, conf: dict, hp: dict, seed: int) -> float:
    """Train brax's PPO on brax env `name` for conf's steps; its deterministic evaluation return."""
    from brax import envs
    from brax.training.agents.ppo import networks, train as brax_ppo

    from ..models.mlp import ACTIVATIONS

    if not hasattr(jax, "device_put_replicated"):  # brax 0.14.2 still calls it; jax 0.10 removed it
        jax.device_put_replicated = lambda x, devices: jax.device_put(  # one device (max_devices_per_host=1)
            jax.tree.map(lambda a: jnp.stack([a] * len(devices)), x), devices[0])
    factory = functools.partial(networks.make_ppo_networks, policy_hidden_layer_sizes=tuple(hp["hidden"]),
                                value_hidden_layer_sizes=tuple(hp["hidden"]), activation=ACTIVATIONS[hp["activation"]])
    _, _, metrics = brax_ppo.train(environment=envs.get_environment(name, backend="positional"), seed=seed,
                                   network_factory=factory, max_devices_per_host=1, **conf)
    return float(metrics["eval/episode_reward"])


def _summary(vals: list[float]) -> dict:
    return {"mean": float(np.mean(vals)), "stderr": rlt.stderr(vals), "per_seed": vals}


def run(cfg: Config) -> dict:
    envs = [e.strip() for e in cfg.envs.split(",") if e.strip()]
    bad = [e for e in envs if rlt.suite_of(e)[0] not in ("gymnax", "brax")]
    if not envs or bad or cfg.seeds < 1 or cfg.budget_steps < 1:
        raise ValueError(f"need gymnax or brax envs (the references: rejax, brax's PPO), seeds >= 1, budget_steps >= 1; "
                         f"got envs {envs}, others {bad}, seeds {cfg.seeds}, budget_steps {cfg.budget_steps}")
    rows, t0 = {}, time.perf_counter()
    for env in envs:
        rc = recipe.Config(env=env, strategy="ppo", seeds=cfg.seeds, budget_steps=cfg.budget_steps, anneal_lr=False,
                           eval_episodes=cfg.eval_episodes, eval_every=10**6, progress=False,
                           run_dir=f"{cfg.out_dir}/{env}")
        hp = resolve(rc)
        ours = recipe.run(rc)
        suite, inner = rlt.suite_of(env)
        if suite == "brax":
            impl, conf = "brax", brax_config(hp, cfg.budget_steps, cfg.eval_episodes, hp["max_steps"] or 1000)
            ref = [run_brax(inner, conf, hp, rc.seed + i) for i in range(cfg.seeds)]
        else:
            impl, conf = "rejax", rejax_config(hp, env, cfg.budget_steps)
            ref = [run_rejax(conf, rc.seed + i, cfg.eval_episodes) for i in range(cfg.seeds)]  # rejax deep-copies it
        a, b = _summary([s["final_return"] for s in ours["per_seed"]]), _summary(ref)
        within = a["mean"] >= b["mean"] - math.hypot(a["stderr"], b["stderr"])
        rows[env] = {"ours": a, "reference": b, "implementation": impl, "within": bool(within),
                     "env_steps_ours": ours["env_steps"], "hyperparameters": {k: v for k, v in conf.items() if k != "env"}}
        print(json.dumps({"env": env, "ours": round(a["mean"], 2), impl: round(b["mean"], 2), "within": bool(within),
                          "elapsed_s": round(time.perf_counter() - t0, 1)}), flush=True)
    return {"bench": "ppo-reference", "budget_steps": cfg.budget_steps, "seeds": cfg.seeds, "rows": rows,
            "within": sum(r["within"] for r in rows.values()), "envs": len(rows),
            "wall_s": round(time.perf_counter() - t0, 1)}
