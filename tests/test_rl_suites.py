"""Adapters for the optional RL suites: reset/step shapes and a short jitted rollout each.

Each test skips when its suite is not installed (`pip install "eggroll-jax[rl]"` installs them).
Brax and Craftax take tens of seconds to compile on a CPU: marked slow (`pytest -m slow`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eggroll.models.mlp import init_mlp
from eggroll.tasks import rl

CASES = [  # name, module, (obs_size, num_outputs, discrete, num_agents), slow
    ("Game2048-v1", "jumanji", (16 * 16, 4, True, 1), False),
    ("Navix-DoorKey-5x5-v0", "navix", (None, 7, True, 1), False),
    ("MPE_simple_spread_v3", "jaxmarl", (18 + 3, 5, True, 3), False),
    ("mpe/simple_speaker_listener_v4", "jaxmarl", (11 + 2, 5, True, 2), True),
    ("MPE_simple_reference_v3", "jaxmarl", (21 + 2, 50, True, 2), True),
    ("brax/inverted_double_pendulum", "brax", (8, 1, False, 1), True),
    ("Craftax-Classic-Symbolic-v1", "craftax", (1345, 17, True, 1), True),
    # the paper's Thrust Control Left; kinetix: `pip install "eggroll-jax[kinetix]"` then
    # `pip install --no-deps kinetix-env==3.0.2` (docs/RL.md)
    ("kinetix/m/h17_thrustcontrol_left", "kinetix", (247, 6, False, 1), True),
]


def _param(name, module, want, slow):
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(name, module, want, marks=marks, id=name)


@pytest.mark.parametrize("name,module,want", [_param(*c) for c in CASES])
def test_adapter_shapes_and_rollout(name, module, want):
    pytest.importorskip(module)
    env = rl.make_env(name, max_steps=8)
    obs_size, n_out, discrete, n_agents = want
    assert (env.num_outputs, env.discrete, env.num_agents) == (n_out, discrete, n_agents)
    if obs_size is not None:
        assert env.obs_size == obs_size
    assert env.horizon == 8
    state, ts = jax.jit(env.reset)(jax.random.PRNGKey(0))
    assert ts.obs.shape == (n_agents, env.obs_size) and ts.obs.dtype == jnp.float32
    assert ts.reward.shape == (n_agents,) and ts.done.shape == () and ts.legal.shape == (n_agents, n_out)
    action = jnp.zeros((n_agents,), jnp.int32) if discrete else jnp.zeros((n_agents, n_out))
    state, ts = jax.jit(env.step)(jax.random.PRNGKey(1), state, action)
    assert ts.obs.shape == (n_agents, env.obs_size) and ts.reward.shape == (n_agents,)

    params = init_mlp(jax.random.PRNGKey(0), rl.policy_sizes(env, (8,)))
    f = jax.jit(lambda k: rl.member_episodes(env, params, None, jax.random.split(k, 2)))
    ret, length = f(jax.random.PRNGKey(3))
    assert ret.shape == (2,) and np.all(np.isfinite(ret)) and np.all((length >= 1) & (length <= 8))
    ret2, _ = f(jax.random.PRNGKey(3))
    np.testing.assert_array_equal(ret, ret2)  # deterministic for a fixed key


def test_mpe_shared_policy_agent_ids_and_masks():
    pytest.importorskip("jaxmarl")
    env = rl.make_env("mpe/simple_speaker_listener_v4")
    _, ts = env.reset(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(ts.obs[:, -2:], np.eye(2))  # one-hot agent id appended
    # the speaker has 3 actions, the listener 5: the shared head has 5, the speaker's last 2 masked
    np.testing.assert_array_equal(ts.legal, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert ts.obs[0, 3:-2].sum() == 0  # speaker's 3-dim obs zero-padded to the listener's 11


def test_jumanji_one_hot_board_and_action_mask():
    jumanji = pytest.importorskip("jumanji")
    env = rl.make_env("Game2048-v1")
    _, ts = env.reset(jax.random.PRNGKey(0))
    _, raw = jumanji.make("Game2048-v1").reset(jax.random.PRNGKey(0))
    cells = np.asarray(raw.observation.board).reshape(16)  # log2 of the tiles, 0 = empty
    want = np.zeros((16, 16))
    want[np.arange(16), cells] = 1.0
    np.testing.assert_array_equal(np.asarray(ts.obs).reshape(16, 16), want)
    assert ts.legal.dtype == jnp.bool_ and ts.legal.shape == (1, 4)


def test_kinetix_guard_checks_jax2d_not_jax(monkeypatch):
    """On jax >= 0.10 Kinetix needs jax2d >= 1.0.2 (1.0.1 calls the removed jnp.clip(a_max=)):
    the guard reads jax2d's version, whatever kinetix-env itself pins."""
    import importlib.metadata as md

    from eggroll.tasks import rl_suites

    versions = {}

    def version(name):
        if name not in versions:
            raise md.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(md, "version", version)
    assert "not installed" in rl_suites._jax2d_ok()
    versions["jax2d"] = "1.0.2"
    assert rl_suites._jax2d_ok() is None
    versions["jax2d"] = "1.0.1"
    problem = rl_suites._jax2d_ok()
    if tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 10):
        assert "jax2d 1.0.1" in problem and "a_max" in problem
    else:
        assert problem is None


def test_kinetix_unknown_level_is_a_value_error():
    pytest.importorskip("kinetix")
    with pytest.raises(ValueError, match="no_such_level"):
        rl.make_env("kinetix/m/no_such_level")
