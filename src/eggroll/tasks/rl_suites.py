"""The RL environment interface (`Env`, `Step`) and the adapters of the JAX suites behind it.

Every environment looks the same to a policy: A agents (A = 1 except MPE), each seeing a flat
float32 vector of `obs_size` features and producing `num_outputs` numbers (logits over the
discrete actions, or a continuous action in [-1, 1] that the adapter rescales to the env's
bounds). Image and grid observations are flattened; integer (categorical) observations are one-hot
encoded, which followed by the policy's first linear layer is exactly a per-position embedding
table. `legal` masks illegal discrete actions (jumanji's action masks; MPE agents with fewer
actions than others).

Multi-agent (jaxmarl MPE): all agents share ONE policy. Each agent's observation is zero-padded to
the largest agent's size and gets a one-hot agent id appended; the policy's head has the largest
action count and each agent's surplus actions are masked. The team's return is the mean over
agents of their returns.

`Env.auto_reset` says whether `step` itself starts the next episode at `done` (PPO resets only
the others; ES rollouts stop at `done` either way). Kinetix needs jax2d >= 1.0.2 on jax >= 0.10
(the guard checks jax2d; install line in KINETIX_INSTALL and docs/RL.md).

SUITES maps a suite to its factory (inner name, max_steps) -> Env; `suite_of` recognises a name's
suite. `from_gymnax` adapts any gymnax-style environment. Use these through
eggroll.tasks.rl.make_env, which re-exports every public name here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

INSTALL_HINT = 'install the RL suites with: pip install "eggroll-jax[rl]"'


class Step(NamedTuple):
    obs: jax.Array  # (A, obs_size) float32
    reward: jax.Array  # (A,) float32
    done: jax.Array  # () bool: the episode ended (terminated or truncated) at this step
    legal: jax.Array  # (A, num_outputs) bool: legal discrete actions (all True if continuous)


class Env(NamedTuple):
    name: str
    suite: str
    obs_size: int
    num_outputs: int  # discrete: number of actions; continuous: action dimension
    discrete: bool
    num_agents: int
    horizon: int  # rollout length: the env's episode limit, capped by make_env(max_steps=)
    reset: Callable  # key -> (state, Step)
    step: Callable  # (key, state, action) -> (state, Step)
    # step() itself starts a fresh episode when one ends (gymnax, craftax, kinetix, MPE): the
    # state and Step it returns at `done` are already the next episode's first; False (brax,
    # jumanji, navix, the default): the caller resets (PPO does; ES rollouts stop at done anyway)
    auto_reset: bool = False


# ------------------------------------------------------------------ observation helpers

def one_hot_obs(x, num_classes: int):
    """Integer array (any shape) -> flat float32 one-hot (x.size * num_classes,); values clipped."""
    x = jnp.clip(jnp.asarray(x).astype(jnp.int32), 0, num_classes - 1)
    return jax.nn.one_hot(x.reshape(-1), num_classes, dtype=jnp.float32).reshape(-1)


def flat_obs(x):
    return jnp.asarray(x).astype(jnp.float32).reshape(-1)


def _single(obs, reward, done, n_out):
    """Wrap a single agent's flat obs into a Step with an agent axis of 1."""
    return Step(obs[None], jnp.reshape(reward, (1,)).astype(jnp.float32),
                jnp.asarray(done).astype(bool).reshape(()), jnp.ones((1, n_out), bool))


def _box_action(low, high, shape):
    """[-1, 1] policy output -> env box [low, high] (per dimension)."""
    low = jnp.broadcast_to(jnp.asarray(low, jnp.float32), shape)
    high = jnp.broadcast_to(jnp.asarray(high, jnp.float32), shape)
    finite = jnp.isfinite(low) & jnp.isfinite(high)
    low, high = jnp.where(finite, low, -1.0), jnp.where(finite, high, 1.0)
    return lambda a: low + (jnp.clip(a.reshape(shape), -1, 1) + 1) * 0.5 * (high - low)


def _obs_size(reset) -> int:
    return int(jax.eval_shape(reset, jax.random.PRNGKey(0))[1].obs.shape[-1])


def _need(module: str, suite: str, name: str, pip: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"environment {name!r} needs the {suite} suite (`pip install {pip}`), which is not "
            f"installed ({e}); {INSTALL_HINT}") from e


# ------------------------------------------------------------------ adapters

def from_gymnax(env, params, *, name="custom", suite="gymnax", max_steps=None, obs_fn=flat_obs,
                auto_reset=True) -> Env:
    """Adapt any gymnax-style environment (reset(key, params), step(key, state, a, params));
    auto_reset: its step resets at done, as gymnax environments do."""
    space = env.action_space(params)
    discrete = hasattr(space, "n")
    if discrete:
        n_out = int(space.n)
        to_env = lambda a: a[0]
    else:
        shape = tuple(space.shape)
        n_out = int(np.prod(shape))
        to_env_box = _box_action(space.low, space.high, shape)
        to_env = lambda a: to_env_box(a[0])
    limit = getattr(params, "max_steps_in_episode", None) or getattr(params, "max_timesteps", None) or 1000
    horizon = int(min(limit, max_steps or limit))

    def reset(key):
        obs, state = env.reset(key, params)
        return state, _single(obs_fn(obs), 0.0, False, n_out)

    def step(key, state, action):
        out = env.step(key, state, to_env(action), params)
        obs, state, reward = out[0], out[1], out[2]
        done = out[3] if len(out) == 5 else jnp.logical_or(out[3], out[4])  # gymnax >= 1.0: term, trunc
        return state, _single(obs_fn(obs), reward, done, n_out)

    return Env(name, suite, _obs_size(reset), n_out, discrete, 1, horizon, reset, step, auto_reset)


def _gymnax(name, max_steps):
    gymnax = _need("gymnax", "gymnax", name, "gymnax")
    env, params = gymnax.make(name)
    return from_gymnax(env, params, name=name, max_steps=max_steps)


def _craftax(name, max_steps):
    mod = _need("craftax.craftax_env", "craftax", name, "craftax")
    if "Pixels" in name:
        raise ValueError(f"{name}: use a Symbolic Craftax variant (pixels are not supported by the MLP policy)")
    env = mod.make_craftax_env_from_name(name, auto_reset=True)
    return from_gymnax(env, env.default_params, name=name, suite="craftax", max_steps=max_steps or 1000)


def _brax(name, max_steps, backend="positional"):
    envs = _need("brax.envs", "brax", name, "brax")
    known = sorted(getattr(envs, "_envs", {}))
    if known and name not in known:
        raise ValueError(f"unknown brax environment {name!r}; brax has {', '.join(known)} (e.g. brax/hopper)")
    env = envs.get_environment(name, backend=backend)
    n_out = int(env.action_size)
    horizon = int(max_steps or 1000)

    def reset(key):
        s = env.reset(key)
        return s, _single(flat_obs(s.obs), 0.0, False, n_out)

    def step(key, state, action):
        s = env.step(state, jnp.clip(action[0], -1, 1))
        return s, _single(flat_obs(s.obs), s.reward, s.done > 0.5, n_out)

    return Env(f"brax/{name}", "brax", _obs_size(reset), n_out, False, 1, horizon, reset, step)


# integer observation leaves -> number of one-hot classes (2048: board holds log2 of the tiles)
JUMANJI_CLASSES = {"Game2048-v1": 16}


def _jumanji(name, max_steps):
    jumanji = _need("jumanji", "jumanji", name, "jumanji")
    env = jumanji.make(name)
    spec = env.action_spec
    if hasattr(spec, "num_values") and np.ndim(spec.num_values) == 0:
        discrete, n_out = True, int(spec.num_values)
    elif not hasattr(spec, "num_values") and hasattr(spec, "minimum"):
        discrete, n_out = False, int(np.prod(spec.shape))
        to_box = _box_action(spec.minimum, spec.maximum, tuple(spec.shape))
    else:
        raise ValueError(f"jumanji {name}: multi-discrete action spaces are not supported yet")
    classes = JUMANJI_CLASSES.get(name)

    def obs_of(o):
        parts = []
        for k, v in (o._asdict() if hasattr(o, "_asdict") else {"obs": o}).items():
            if k == "action_mask" or k == "step_count":
                continue
            ints = jnp.issubdtype(jnp.asarray(v).dtype, jnp.integer)
            parts.append(one_hot_obs(v, classes) if ints and classes else flat_obs(v))
        return jnp.concatenate(parts)

    def legal_of(o):
        mask = getattr(o, "action_mask", None)
        return jnp.ones((1, n_out), bool) if mask is None or not discrete else mask.reshape(1, n_out)

    def wrap(ts):
        s = _single(obs_of(ts.observation), ts.reward, ts.last(), n_out)
        return s._replace(legal=legal_of(ts.observation))

    def reset(key):
        state, ts = env.reset(key)
        return state, wrap(ts)._replace(reward=jnp.zeros((1,)), done=jnp.asarray(False))

    def step(key, state, action):
        state, ts = env.step(state, action[0] if discrete else to_box(action[0]))
        return state, wrap(ts)

    return Env(name, "jumanji", _obs_size(reset), n_out, discrete, 1, int(max_steps or 1000), reset, step)


NAVIX_CLASSES = 12  # symbolic grid codes (entity / colour / state) are small integers


def _navix(name, max_steps):
    nx = _need("navix", "navix", name, "navix")
    env = nx.make(name)
    n_out = int(env.action_space.maximum) + 1
    horizon = int(min(env.max_steps, max_steps or env.max_steps))

    def wrap(ts, first=False):
        reward = 0.0 if first else ts.reward
        return _single(one_hot_obs(ts.observation, NAVIX_CLASSES), reward, ts.is_done(), n_out)

    def reset(key):
        ts = env.reset(key)
        return ts, wrap(ts, first=True)._replace(done=jnp.asarray(False))

    def step(key, state, action):
        ts = env.step(state, action[0])
        return ts, wrap(ts)

    return Env(name, "navix", _obs_size(reset), n_out, True, 1, horizon, reset, step)


KINETIX_INSTALL = 'pip install "eggroll-jax[kinetix]" && pip install --no-deps kinetix-env==3.0.2'


def _jax2d_ok() -> str | None:
    """None if the installed jax2d runs on this jax, else why not. jax2d 1.0.1 (kinetix-env
    3.0.2's pin) calls jnp.clip(a_max=...), which jax 0.10 removed; 1.0.2 does not."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        have = version("jax2d")
    except PackageNotFoundError:
        return "jax2d is not installed"
    number = lambda v: tuple(int(p) for p in v.split(".")[:3] if p.isdigit())
    if number(jax.__version__)[:2] >= (0, 10) and number(have) < (1, 0, 2):
        return f"jax2d {have} calls jnp.clip(a_max=...), removed in jax 0.10 (this is jax {jax.__version__})"
    return None


def _kinetix(level, max_steps):
    """A Kinetix level by its name in kinetix/levels (e.g. m/h17_thrustcontrol_left, the paper's
    Thrust Control Left): continuous actions, flat symbolic observations, auto-reset."""
    name = f"kinetix/{level}"
    _need("kinetix", "kinetix", name, "kinetix-env")
    problem = _jax2d_ok()
    if problem:  # an installation problem: ModuleNotFoundError, which the CLI reports in one line
        raise ModuleNotFoundError(f"environment {name!r}: {problem}; install Kinetix with: {KINETIX_INSTALL}")
    from kinetix.environment import ActionType, ObservationType, make_kinetix_env
    from kinetix.util.saving import get_correct_path_of_json_level, load_from_json_file

    if not os.path.exists(get_correct_path_of_json_level(level)):
        raise ValueError(f"unknown Kinetix level {level!r} (no {get_correct_path_of_json_level(level)}); "
                         "names look like kinetix/m/h17_thrustcontrol_left")
    state0, static, params = load_from_json_file(level)
    env = make_kinetix_env(ActionType.CONTINUOUS, ObservationType.SYMBOLIC_FLAT,
                           lambda key: state0, params, static, auto_reset=True)
    return from_gymnax(env, params, name=name, suite="kinetix", max_steps=max_steps)


def _mpe(name, max_steps):
    jaxmarl = _need("jaxmarl", "jaxmarl", name, "jaxmarl")
    full = name if name.startswith("MPE_") else f"MPE_{name}"
    env = jaxmarl.make(full)
    agents = list(env.agents)
    n_agents = len(agents)
    sizes = [int(env.observation_space(a).shape[0]) for a in agents]
    n_acts = [int(env.action_space(a).n) for a in agents]
    width, n_out = max(sizes), max(n_acts)
    legal = jnp.asarray(np.arange(n_out)[None, :] < np.asarray(n_acts)[:, None])
    ids = jnp.eye(n_agents, dtype=jnp.float32)

    def obs_of(obs):  # pad each agent's vector to `width`, append its one-hot id
        rows = [jnp.pad(obs[a].astype(jnp.float32), (0, width - s)) for a, s in zip(agents, sizes)]
        return jnp.concatenate([jnp.stack(rows), ids], axis=1)

    def reset(key):
        obs, state = env.reset(key)
        return state, Step(obs_of(obs), jnp.zeros((n_agents,)), jnp.asarray(False), legal)

    def step(key, state, action):
        obs, state, reward, dones, _ = env.step(key, state, {a: action[i] for i, a in enumerate(agents)})
        rew = jnp.stack([reward[a] for a in agents]).astype(jnp.float32)
        return state, Step(obs_of(obs), rew, dones["__all__"], legal)

    horizon = int(min(env.max_steps, max_steps or env.max_steps))
    return Env(full, "jaxmarl", width + n_agents, n_out, True, n_agents, horizon, reset, step, True)


SUITES: dict[str, Callable] = {"gymnax": _gymnax, "brax": _brax, "jumanji": _jumanji, "navix": _navix,
                               "craftax": _craftax, "kinetix": _kinetix, "mpe": _mpe}
BRAX_ENVS = ("ant", "fast", "halfcheetah", "hopper", "humanoid", "humanoidstandup", "inverted_pendulum",
             "inverted_double_pendulum", "pusher", "reacher", "walker2d")
JUMANJI_PREFIXES = ("Game2048", "Snake", "Maze", "Minesweeper", "RubiksCube", "Sudoku", "Cleaner",
                    "Connector", "Tetris", "BinPack", "Knapsack", "TSP", "CVRP", "JobShop", "PacMan", "Sokoban")


def suite_of(name: str) -> tuple[str, str]:
    """'brax/hopper' -> ('brax', 'hopper'); bare names are recognised by their registry."""
    if "/" in name and name.split("/", 1)[0] in SUITES:
        return tuple(name.split("/", 1))  # type: ignore[return-value]
    if name.startswith("MPE_"):
        return "mpe", name
    if name.startswith("Navix-"):
        return "navix", name
    if name.startswith("Craftax-"):
        return "craftax", name
    if name in BRAX_ENVS:
        return "brax", name
    if name.startswith(JUMANJI_PREFIXES):
        return "jumanji", name
    return "gymnax", name
