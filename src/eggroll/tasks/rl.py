"""JAX RL environments behind one small interface, and jitted policy rollouts -> ES fitness.

    env = make_env("CartPole-v1")            # gymnax; also brax, jumanji, navix, craftax, kinetix, MPE
    state, ts = env.reset(key)               # ts: Step(obs (A, obs_size), reward (A,), done (), legal)
    state, ts = env.step(key, state, action) # action: (A,) int32 (discrete) or (A, num_outputs) in [-1, 1]

Every environment looks the same to a policy: A agents (A = 1 except MPE) with flat float32
observations of `obs_size` features and `num_outputs` outputs (discrete logits, masked by
`legal`, or a continuous action in [-1, 1]); MPE agents share one policy. The `Env` / `Step`
interface and the suite adapters (observation encodings, action rescaling, multi-agent padding)
are in tasks/rl_suites.py; every public name there is importable from here too.

Names: "CartPole-v1" (gymnax registry), "brax/hopper", "Game2048-v1" or "jumanji/Game2048-v1",
"Navix-DoorKey-8x8-v0", "Craftax-Classic-Symbolic-v1", "kinetix/s/h0_weak_thrust",
"MPE_simple_spread_v3" or "mpe/simple_spread_v3"; or "package.module:function" naming a factory
of your own that returns an `Env` (wrap a gymnax-style environment with `from_gymnax`).

Rollouts: `episode` plays one episode as a lax.scan over `env.horizon` steps with a deterministic
policy (argmax over legal logits, or tanh); steps after `done` are masked out, so adapters that
auto-reset and adapters that do not give the same return. `population_fitness` vmaps episodes
over members and evaluates the population with eggroll.evaluate_population.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..models.mlp import mlp
from ..population import evaluate_population
from .rl_suites import (  # noqa: F401 (re-exported: eggroll.tasks.rl.Env, from_gymnax, SUITES...)
    BRAX_ENVS, INSTALL_HINT, JUMANJI_CLASSES, JUMANJI_PREFIXES, NAVIX_CLASSES, SUITES, Env, Step, _box_action,
    _need, _obs_size, _single, flat_obs, from_gymnax, one_hot_obs, suite_of,
)


def make_env(name, *, max_steps: int | None = None) -> Env:
    """An `Env` by name (see the module docstring); max_steps caps the rollout horizon."""
    if isinstance(name, Env):
        return name
    if not isinstance(name, str) or not name:
        raise ValueError(f"environment name must be a non-empty string, got {name!r}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if ":" in name:  # user factory "pkg.mod:fn"
        mod, fn = name.split(":", 1)
        env = getattr(importlib.import_module(mod), fn)()
        if not isinstance(env, Env):
            raise TypeError(f"{name} returned {type(env).__name__}; it must return eggroll.tasks.rl.Env "
                            "(wrap a gymnax-style environment with eggroll.tasks.rl.from_gymnax)")
        return env._replace(horizon=min(env.horizon, max_steps)) if max_steps else env
    suite, inner = suite_of(name)
    if suite == "gymnax":
        gymnax = _need("gymnax", "gymnax", name, "gymnax")
        if inner not in gymnax.registered_envs:
            raise ValueError(f"unknown environment {name!r}: not in the gymnax registry, and no suite prefix "
                             f"(one of {sorted(SUITES)}, e.g. 'brax/hopper', 'mpe/simple_spread_v3')")
    return SUITES[suite](inner, max_steps)


# ------------------------------------------------------------------ policy and rollouts

def policy_sizes(env: Env, hidden) -> tuple[int, ...]:
    return (env.obs_size, *hidden, env.num_outputs)


def act(env: Env, out, legal):
    """Deterministic action from policy outputs (A, num_outputs)."""
    if env.discrete:
        return jnp.argmax(jnp.where(legal, out, -jnp.inf), axis=-1).astype(jnp.int32)
    return jnp.tanh(out)


def episode(env: Env, apply: Callable, key):
    """One episode with actions act(apply(obs)); apply maps (A, obs_size) -> (A, num_outputs).
    Returns (team return = mean over agents, length in env steps). Steps after done are masked."""
    k_reset, k_step = jax.random.split(key)
    state, ts = env.reset(k_reset)

    def body(carry, t):
        state, ts, alive, ret, length = carry
        action = act(env, apply(ts.obs), ts.legal)
        state, ts = env.step(jax.random.fold_in(k_step, t), state, action)
        ret = ret + alive * ts.reward.mean()
        length = length + alive.astype(jnp.int32)
        alive = alive * (1.0 - ts.done.astype(jnp.float32))
        return (state, ts, alive, ret, length), None

    carry = (state, ts, jnp.float32(1.0), jnp.float32(0.0), jnp.int32(0))
    (_, _, _, ret, length), _ = lax.scan(body, carry, jnp.arange(env.horizon))
    return ret, length


def mlp_apply(params, noise=None, activation="tanh"):
    """The shared policy over the agent axis: (A, obs_size) -> (A, num_outputs)."""
    return lambda obs: mlp(params, obs, noise, activation=activation)


def member_episodes(env: Env, params, noise, keys, activation="tanh"):
    """Returns and lengths of one member over len(keys) episodes."""
    return jax.vmap(lambda k: episode(env, mlp_apply(params, noise, activation), k))(keys)


def population_fitness(env: Env, es, ctx, es_state, params, key, *, episodes=1, activation="tanh",
                       common_random_numbers=True, chunk=None):
    """(fitness (N,), env steps (N,)): member m's mean return over `episodes` episodes with
    params + sigma * E_m. With common random numbers every member plays the same start states
    (differences come from the perturbations alone); otherwise member m's keys fold in m."""
    def member(m):
        k = key if common_random_numbers else jax.random.fold_in(key, m)
        ret, length = member_episodes(env, params, es.noise(ctx, es_state, m), jax.random.split(k, episodes),
                                      activation)
        return ret.mean(), length.sum()

    return evaluate_population(member, es.population, chunk=chunk)


def evaluate_policy(env: Env, params, key, episodes: int, activation="tanh"):
    """Returns (episodes,) of the unperturbed deterministic policy."""
    return member_episodes(env, params, None, jax.random.split(key, episodes), activation)[0]


def stderr(xs) -> float:
    xs = np.asarray(xs, np.float64)
    return float(xs.std(ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else 0.0


class Trainer(NamedTuple):
    """What both ES and PPO provide to the `rl` recipe: one compile, any number of seeds. Every
    array it returns is replicated over every device of every process (`distributed.replicate`)."""

    env: Env
    init: Callable  # seed -> the generation-0 state (checkpointed by the harness)
    context: Callable  # seed -> the run's constant step input (ES: the noise context; PPO: None)
    step: Callable  # (state, context) -> (state, metrics incl. "env_steps")
    evaluate: Callable  # (state, key) -> (eval_episodes,) returns of the deterministic policy
    params: Callable  # state -> policy params
    num_params: int
    communication: Callable | None = None  # (state, context) -> bytes per generation / update (measured)
