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
"Navix-DoorKey-8x8-v0", "Craftax-Classic-Symbolic-v1", "kinetix/m/h17_thrustcontrol_left",
"MPE_simple_spread_v3" or "mpe/simple_spread_v3"; or "package.module:function" naming a factory
of your own that returns an `Env` (wrap a gymnax-style environment with `from_gymnax`).

Rollouts: `rollout` / `episode` play one episode with a deterministic policy (argmax over legal
logits, or tanh) as a lax.while_loop that stops at `done` (or `env.horizon` steps); under vmap
it stops when every episode of the batch is done, and nothing after an episode's `done` reaches
its return, so adapters that auto-reset and adapters that do not give the same return.
`population_fitness` vmaps episodes over members and evaluates the population with
eggroll.evaluate_population. `ObsStats` / `merge_obs_moments` / `normalize_obs`: the running
observation normalisation every method can use; `spend` / `budget_fraction`: how far a run is
through its budget (the learning-rate schedules follow it).
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
    try:
        return SUITES[suite](inner, max_steps)
    except KeyError as e:  # a suite's registry lookup: one line naming the name, not a traceback
        raise ValueError(f"unknown environment {name!r}: the {suite} suite has no {e} (check the spelling; "
                         f"see docs/RL.md for the names)") from None


# ------------------------------------------------------------------ policy and rollouts

def policy_sizes(env: Env, hidden) -> tuple[int, ...]:
    return (env.obs_size, *hidden, env.num_outputs)


def act(env: Env, out, legal):
    """Deterministic action from policy outputs (A, num_outputs)."""
    if env.discrete:
        return jnp.argmax(jnp.where(legal, out, -jnp.inf), axis=-1).astype(jnp.int32)
    return jnp.tanh(out)


class Rollout(NamedTuple):
    """One episode (or a sum of them): team return, env steps, and the sums of (obs - shift) and
    (obs - shift)^2 over the observations the policy acted on (empty arrays without a shift)."""

    ret: jax.Array
    length: jax.Array
    obs_sum: jax.Array
    obs_sq: jax.Array


def rollout(env: Env, apply: Callable, key, shift=None) -> Rollout:
    """One episode with actions act(apply(obs)); apply maps (A, obs_size) -> (A, num_outputs).

    A lax.while_loop that runs while the episode is alive and shorter than env.horizon. Under
    vmap (a member's episodes, a chunk of members) the loop runs until every episode of the
    batch is done, and a finished episode's carry is kept by a select, so nothing after its
    `done` (a NaN reward included) reaches its return; the return is the same as a scan over
    the whole horizon with the steps after done masked out. `shift` (obs_size,): also sum the
    observations' moments about it (observation normalisation)."""
    k_reset, k_step = jax.random.split(key)
    state, ts = env.reset(k_reset)
    width = env.obs_size if shift is not None else 0

    def moments(obs, s1, s2):
        if shift is None:
            return s1, s2
        d = obs - shift
        return s1 + d.sum(0), s2 + (d * d).sum(0)

    def cond(c):
        return c[2] & (c[3] < env.horizon)

    def body(c):
        state, ts, alive, t, ret, s1, s2 = c
        s1, s2 = moments(ts.obs, s1, s2)
        action = act(env, apply(ts.obs), ts.legal)
        state, ts = env.step(jax.random.fold_in(k_step, t), state, action)
        ret = jnp.where(alive, ret + ts.reward.mean(), ret)  # a select: never 0 * NaN
        return state, ts, alive & ~ts.done, t + 1, ret, s1, s2

    zero = jnp.zeros((width,), jnp.float32)
    carry = (state, ts, jnp.asarray(True), jnp.int32(0), jnp.float32(0.0), zero, zero)
    _, _, _, length, ret, s1, s2 = lax.while_loop(cond, body, carry)
    return Rollout(ret, length, s1, s2)


def episode(env: Env, apply: Callable, key):
    """(team return = mean over agents, length in env steps) of one episode (see `rollout`)."""
    out = rollout(env, apply, key)
    return out.ret, out.length


def mlp_apply(params, noise=None, activation="tanh", obs_stats=None):
    """The shared policy over the agent axis: (A, obs_size) -> (A, num_outputs); with obs_stats
    the observations are normalised first (normalize_obs)."""
    if obs_stats is None:
        return lambda obs: mlp(params, obs, noise, activation=activation)
    return lambda obs: mlp(params, normalize_obs(obs_stats, obs), noise, activation=activation)


def member_rollouts(env: Env, params, noise, keys, activation="tanh", obs_stats=None, shift=None) -> Rollout:
    """`rollout` of one member for each of `keys` (vmapped; every field has a leading axis)."""
    apply = mlp_apply(params, noise, activation, obs_stats)
    return jax.vmap(lambda k: rollout(env, apply, k, shift))(keys)


def member_episodes(env: Env, params, noise, keys, activation="tanh", obs_stats=None):
    """Returns and lengths of one member over len(keys) episodes."""
    out = member_rollouts(env, params, noise, keys, activation, obs_stats)
    return out.ret, out.length


def population_rollouts(env: Env, es, ctx, es_state, params, key, *, episodes=1, activation="tanh",
                        common_random_numbers=True, chunk=None, obs_stats=None, shift=None) -> Rollout:
    """Per member (leading axis N): mean return over `episodes` episodes with params + sigma *
    E_m, env steps, and (with `shift`) the observation moments summed over its episodes. With
    common random numbers every member plays the same start states (differences come from the
    perturbations alone); otherwise each antithetic pair (members 2p, 2p + 1) gets its own
    episodes (keys fold in m // 2), so the two sides of a pair still differ by the noise alone."""
    def member(m):
        k = key if common_random_numbers else jax.random.fold_in(key, m // 2)
        out = member_rollouts(env, params, es.noise(ctx, es_state, m), jax.random.split(k, episodes), activation,
                              obs_stats, shift)
        return Rollout(out.ret.mean(), out.length.sum(), out.obs_sum.sum(0), out.obs_sq.sum(0))

    return evaluate_population(member, es.population, chunk=chunk)


def population_fitness(env: Env, es, ctx, es_state, params, key, **kw):
    """(fitness (N,), env steps (N,)) of `population_rollouts` (same keywords, no shift)."""
    out = population_rollouts(env, es, ctx, es_state, params, key, **kw)
    return out.ret, out.length


def evaluate_policy(env: Env, params, key, episodes: int, activation="tanh", obs_stats=None):
    """Returns (episodes,) of the unperturbed deterministic policy."""
    return member_episodes(env, params, None, jax.random.split(key, episodes), activation, obs_stats)[0]


# ------------------------------------------------------------------ observation normalisation

OBS_CLIP = 5.0  # normalised observations are clipped to [-5, 5] (as Salimans et al. / gym do)


class ObsStats(NamedTuple):
    """Running mean and (population) variance of every observation feature seen so far."""

    count: jax.Array  # () float32
    mean: jax.Array  # (obs_size,)
    var: jax.Array  # (obs_size,)


def obs_stats_init(size: int) -> ObsStats:
    return ObsStats(jnp.float32(0.0), jnp.zeros((size,), jnp.float32), jnp.ones((size,), jnp.float32))


def normalize_obs(stats: ObsStats, obs):
    return jnp.clip((obs - stats.mean) / jnp.sqrt(stats.var + 1e-8), -OBS_CLIP, OBS_CLIP)


def merge_obs_moments(stats: ObsStats, n, obs_sum, obs_sq) -> ObsStats:
    """Fold in n new observations, given the sums of (x - stats.mean) and (x - stats.mean)^2
    (moments about the running mean: no cancellation when the mean is large). Chan et al.'s
    parallel update; n == 0 leaves the statistics unchanged."""
    n = jnp.asarray(n, jnp.float32)
    total = stats.count + n
    safe_n, safe_total = jnp.maximum(n, 1.0), jnp.maximum(total, 1.0)
    delta = obs_sum / safe_n  # batch mean - running mean
    batch_var = jnp.maximum(obs_sq / safe_n - delta * delta, 0.0)
    mean = stats.mean + delta * (n / safe_total)
    m2 = stats.var * stats.count + batch_var * n + delta * delta * (stats.count * n / safe_total)
    new = ObsStats(total, mean, m2 / safe_total)
    return jax.tree_util.tree_map(lambda a, b: jnp.where(n > 0, a, b), new, stats)


# ------------------------------------------------------------------ budget progress

def progress_init() -> jax.Array:
    """The fractions of each budget a run has spent: [env steps, training wall clock]."""
    return jnp.zeros((2,), jnp.float32)


def budget_fraction(progress) -> jax.Array:
    """How far through its budget a run is: the larger fraction spent, in [0, 1]."""
    return jnp.clip(jnp.max(progress), 0.0, 1.0)


def spend(progress, env_steps, budget_steps: int) -> jax.Array:
    """progress after a generation / update of `env_steps` env steps."""
    return progress.at[0].add(jnp.asarray(env_steps, jnp.float32) / budget_steps)


spend_time = jax.jit(lambda progress, frac: progress.at[1].add(frac))  # the host adds its wall clock


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
