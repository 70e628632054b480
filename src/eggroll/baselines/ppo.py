"""PPO (clipped surrogate, GAE) on the eggroll.tasks.rl adapters: the RL recipe's gradient baseline.

One update = one jitted call: `num_envs` environments step `rollout_len` times (lax.scan, vmap over
environments), advantages by GAE(gamma, lambda), then `ppo_epochs` x `minibatches` Adam steps on

    L = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + vf_coef * max((V - R)^2, (V_clip - R)^2) / 2 - ent_coef * H,

rho = pi(a|s) / pi_old(a|s), V_clip = V_old + clip(V - V_old, -eps, eps) (clip_vloss; else the
plain (V - R)^2), advantages normalised per minibatch, the actor's and the critic's gradients
each clipped to global norm max_grad_norm (clip_actor_and_critic), the
learning rate annealed linearly to 0 over the run's budget (anneal_lr; CleanRL's and PureJaxRL's
defaults). Actor and critic are separate MLPs (models/mlp.py) with the ES policy's sizes and
activation, initialised orthogonally (gain sqrt 2; the actor's last layer 0.01, the critic's 1;
zero biases) as CleanRL does. obs_norm: the policy sees observations normalised by running
statistics (tasks.rl.ObsStats), updated from each rollout's observations after the update. Discrete: a categorical over the legal logits. Continuous: a Gaussian around
tanh(actor(obs)) with a learned state-independent log std; the env receives the sample clipped to
[-1, 1]. The deterministic evaluation policy is argmax / tanh(actor(obs)) -- the same map the ES
policies use, so eval returns compare like for like. MPE: agents share the actor and critic
(parameter sharing; each agent's transitions are separate samples with its own reward).

Data parallel over every device of every process (`population_mesh`, D devices): each device
steps num_envs / D of the environments (its rows of the replicated state; the random numbers are
drawn for all environments and sliced: the same parameters give the same rollout for any D),
computes GAE on them and draws its own minibatches from its samples; a minibatch's gradient, its
loss terms and advantage statistics are sums of the devices' shares, taken in one fixed order
(grad_reduce "gather": population.device_sum, the same bits for any split of the devices over
processes) or by XLA's all-reduce ("psum"). The environments' states are all-gathered once per
update so the state stays replicated (what the checkpoint needs). One device: no collective, the
single-device algorithm. `update_communication` measures the bytes of one update, loops counted
as often as they run (distributed.communication does).

Environments that reset themselves inside `step` (Env.auto_reset) are only reset here when the
horizon cuts an episode; the others when an episode ends; the batched reset runs (lax.cond) only
on the steps where some environment needs it.

Simplifications (stated, not hidden): episodes cut by the rollout horizon are treated as terminal
(no value bootstrap at truncation); no reward normalisation.

Why our own PPO rather than rejax (which installs beside jax 0.10.2): rejax wants a gymnax
environment object and runs the whole training budget as one jitted call with its own flax
networks; it has no multi-agent (MPE) or action-mask path, and per-update wall-clock / env-step
curves would have to come back through callbacks. This file drives the same adapters, the same
MLP and the same evaluation as the ES runs, which is what a like-for-like comparison needs.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from .. import distributed
from ..distributed.comm import collective_bytes, hlo_communication
from ..models.mlp import mlp
from ..population import AXIS, device_sum, population_mesh, shard_map_unchecked
from ..tasks import rl as rlt


class PPOState(NamedTuple):
    params: Any  # {"actor": mlp, "critic": mlp, "log_std": (num_outputs,)}
    opt_state: Any
    env_state: Any  # batched over num_envs
    ts: Any  # rlt.Step batched over num_envs
    t: jax.Array  # (num_envs,) steps into the current episode
    ep_ret: jax.Array  # (num_envs,) running team return
    rng: jax.Array
    obs_stats: Any  # rlt.ObsStats (unchanged unless obs_norm)
    progress: jax.Array  # rlt.progress_init(): the budget spent (the learning rate anneals with it)


def _policy_obs(c, s, obs):
    return rlt.normalize_obs(s.obs_stats, obs) if c.hp.get("obs_norm") else obs


def _dist(env, params, obs, legal, activation):
    """Policy outputs for obs (..., A, F): (logits or mean, log_std, value)."""
    out = mlp(params["actor"], obs, activation=activation)
    value = mlp(params["critic"], obs, activation=activation)[..., 0]
    if env.discrete:
        return jnp.where(legal, out, -1e9), None, value
    return jnp.tanh(out), params["log_std"], value


def _log_prob(env, head, log_std, action):
    if env.discrete:
        return jnp.take_along_axis(jax.nn.log_softmax(head), action[..., None], -1)[..., 0]
    z = (action - head) / jnp.exp(log_std)
    return jnp.sum(-0.5 * z ** 2 - log_std - 0.5 * math.log(2 * math.pi), -1)


def _entropy(env, head, log_std):
    if env.discrete:
        logp = jax.nn.log_softmax(head)
        return -jnp.sum(jnp.where(head > -1e8, jnp.exp(logp) * logp, 0.0), -1)
    return jnp.sum(log_std + 0.5 * math.log(2 * math.pi * math.e)) * jnp.ones(head.shape[:-1])


def _sample(env, key, head, log_std, n_envs: int, block):
    """Sample actions for this device's environments: the noise is drawn for all `n_envs`
    environments (the same numbers for any device count) and `block` keeps this device's."""
    shape = (n_envs, *head.shape[1:])
    if env.discrete:  # = jax.random.categorical(key, logits): argmax(logits + Gumbel noise)
        return jnp.argmax(block(jax.random.gumbel(key, shape, head.dtype)) + head, axis=-1).astype(jnp.int32)
    return head + jnp.exp(log_std) * block(jax.random.normal(key, shape))


def gae(rewards, values, dones, last_value, gamma, lam):
    """Generalised advantage estimation, backwards over time. rewards/values (T, ...), dones (T, ...)
    (1 where the episode ended at that step). Returns (advantages, returns = advantages + values)."""
    def body(carry, x):
        adv_next, v_next = carry
        r, v, d = x
        delta = r + gamma * v_next * (1 - d) - v
        adv = delta + gamma * lam * (1 - d) * adv_next
        return (adv, v), adv

    _, adv = lax.scan(body, (jnp.zeros_like(last_value), last_value), (rewards, values, dones), reverse=True)
    return adv, adv + values


class _Setup(NamedTuple):
    """What every part of one PPO update needs to know."""

    env: rlt.Env
    hp: dict
    sizes: tuple
    tx: Any  # optax chain: clip by global norm, Adam
    devices: int  # D: every device of every process
    n_envs: int  # E, over all devices
    local: int  # E / D: the environments of one device
    budget_steps: int = 1  # the env-step budget the learning rate anneals over


def _reductions(c: _Setup):
    """(sum over the devices of a pytree, this device's share of a mean over every device's
    samples). One device: (identity, jnp.mean). 'gather' is population.device_sum (one fixed
    order of addition, the same bits for any process layout); 'psum' is XLA's all-reduce."""
    if c.devices == 1:
        return (lambda tree: tree), jnp.mean

    def gsum(tree):
        if c.hp["grad_reduce"] == "psum":
            return lax.psum(tree, AXIS)
        return device_sum(tree, AXIS, c.devices)

    return gsum, lambda x: x.sum() / (x.size * c.devices)


def init_orthogonal(key, sizes, last_gain: float):
    """An MLP (models/mlp.py layout) with orthogonal weights, gain sqrt(2) on the hidden layers
    and `last_gain` on the last, zero biases (CleanRL's layer_init)."""
    keys = jax.random.split(key, len(sizes) - 1)
    gains = [math.sqrt(2.0)] * (len(sizes) - 2) + [last_gain]
    return {"layers": [{"w": jax.nn.initializers.orthogonal(g)(k, (n_out, n_in), jnp.float32),
                        "b": jnp.zeros((n_out,), jnp.float32)}
                       for k, g, n_in, n_out in zip(keys, gains, sizes[:-1], sizes[1:])]}


def _init(c: _Setup, seed):
    ka, kc, ke, kr = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {"actor": init_orthogonal(ka, c.sizes, 0.01), "critic": init_orthogonal(kc, (*c.sizes[:-1], 1), 1.0),
              "log_std": jnp.full((c.env.num_outputs,), -0.5, jnp.float32)}  # not weak-typed: steps keep its type
    env_state, ts = jax.vmap(c.env.reset)(jax.random.split(ke, c.n_envs))
    E = c.n_envs
    return PPOState(params, c.tx.init(params), env_state, ts, jnp.zeros((E,), jnp.int32), jnp.zeros((E,)), kr,
                    rlt.obs_stats_init(c.env.obs_size), rlt.progress_init())


def _env_step(c: _Setup, block, s: PPOState, key):
    """One step of this device's environments; keys are split for all E, `block` keeps ours."""
    env, act, E, El = c.env, c.hp["activation"], c.n_envs, c.local
    k_act, k_step, k_reset = jax.random.split(key, 3)
    obs = _policy_obs(c, s, s.ts.obs)
    head, log_std, value = _dist(env, s.params, obs, s.ts.legal, act)
    action = _sample(env, k_act, head, log_std, E, block)
    logp = _log_prob(env, head, log_std, action)
    env_action = action if env.discrete else jnp.clip(action, -1, 1)
    env_state, ts = jax.vmap(env.step)(block(jax.random.split(k_step, E)), s.env_state, env_action)
    t = s.t + 1
    cut = t >= env.horizon
    done = ts.done | cut
    ep_ret = s.ep_ret + ts.reward.mean(-1)
    need = (cut & ~ts.done) if env.auto_reset else done  # auto-reset envs restarted themselves at done

    def fresh(pair):
        fresh_state, fresh_ts = jax.vmap(env.reset)(block(jax.random.split(k_reset, E)))
        pick = lambda new, old: jnp.where(need.reshape((El,) + (1,) * (new.ndim - 1)), new, old)
        return jax.tree_util.tree_map(pick, (fresh_state, fresh_ts), pair)

    env_state, next_ts = lax.cond(need.any(), fresh, lambda pair: pair, (env_state, ts))
    trans = {"obs": obs, "legal": s.ts.legal, "action": action, "logp": logp, "value": value,
             "reward": ts.reward, "done": done, "finished": jnp.where(done, ep_ret, 0.0)}
    if c.hp.get("obs_norm"):  # the statistics are updated from the raw observations
        trans["raw_obs"] = s.ts.obs
    s = s._replace(env_state=env_state, ts=next_ts, t=jnp.where(done, 0, t), ep_ret=jnp.where(done, 0.0, ep_ret))
    return s, trans


def _loss(c: _Setup, params, b, adv_stats, mean):
    """The clipped-surrogate loss of a minibatch (this device's share of it when mean is one)."""
    hp = c.hp
    head, log_std, value = _dist(c.env, params, b["obs"], b["legal"], hp["activation"])
    logp = _log_prob(c.env, head, log_std, b["action"])
    ratio = jnp.exp(logp - b["logp"])
    adv = (b["adv"] - adv_stats[0]) / (adv_stats[1] + 1e-8)
    eps = hp["clip_eps"]
    pg = -mean(jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - eps, 1 + eps) * adv))
    err = (value - b["ret"]) ** 2
    if hp.get("clip_vloss", True):
        clipped = b["value"] + jnp.clip(value - b["value"], -eps, eps)
        err = jnp.maximum(err, (clipped - b["ret"]) ** 2)
    vf = 0.5 * mean(err)
    ent = mean(_entropy(c.env, head, log_std))
    return pg + hp["vf_coef"] * vf - hp["ent_coef"] * ent, (pg, vf, ent)


def _adv_stats(c: _Setup, adv, gsum):
    """Mean and std of the minibatch's advantages over every device's share of it."""
    if c.devices == 1:
        return adv.mean(), adv.std()
    total, sq = gsum((adv.sum(), (adv * adv).sum()))
    n = adv.size * c.devices
    mean = total / n
    return mean, jnp.sqrt(jnp.maximum(sq / n - mean * mean, 0.0))


def clip_actor_and_critic(max_norm: float) -> optax.GradientTransformation:
    """Clip the actor's gradient (log_std included) and the critic's each to global norm max_norm.
    One joint norm (CleanRL's, which normalises rewards) lets the critic's gradient -- value errors
    in the hundreds on unnormalised returns, e.g. Pendulum -- shrink the actor's step to almost
    nothing: at 1M steps on Pendulum ours then stayed at -1474 where rejax (separate actor and
    critic optimisers) reached -587 (docs/RESULTS.md)."""
    clip = optax.clip_by_global_norm(max_norm)

    def update(grads, state, params=None):
        actor, _ = clip.update({k: v for k, v in grads.items() if k != "critic"}, state)
        critic, _ = clip.update(grads["critic"], state)
        return {**actor, "critic": critic}, state

    return optax.GradientTransformation(clip.init, update)


def lr_scale(c: _Setup, progress):
    """The learning rate's factor for this update: 1 - the budget spent (anneal_lr), else 1."""
    return 1.0 - rlt.budget_fraction(progress) if c.hp.get("anneal_lr", True) else jnp.float32(1.0)


def _learn(c: _Setup, params, opt_state, batch, key, dev, scale):
    """ppo_epochs x minibatches Adam steps on this device's samples (every device draws its own
    minibatches; the gradient of the whole minibatch is the sum of the devices' shares); every
    step's update is multiplied by `scale` (the annealed learning rate: Adam's update is linear
    in it)."""
    M = c.hp["minibatches"]
    n = batch["adv"].shape[0]
    mb = n // M
    gsum, mean = _reductions(c)

    def epoch(carry, key):
        key = key if c.devices == 1 else jax.random.fold_in(key, dev)
        perm = jax.random.permutation(key, n)[: mb * M].reshape(M, mb)

        def minibatch(carry, idx):
            params, opt_state = carry
            b = jax.tree_util.tree_map(lambda x: x[idx], batch)
            stats = _adv_stats(c, b["adv"], gsum)  # not a function of params: no gradient through it
            grads, aux = jax.grad(lambda p: _loss(c, p, b, stats, mean), has_aux=True)(params)
            grads, aux = gsum((grads, aux))
            updates, opt_state = c.tx.update(grads, opt_state, params)
            updates = jax.tree_util.tree_map(lambda u: u * scale, updates)
            return (optax.apply_updates(params, updates), opt_state), aux

        return lax.scan(minibatch, carry, perm)

    return lax.scan(epoch, (params, opt_state), jax.random.split(key, c.hp["ppo_epochs"]))


def _obs_update(c: _Setup, s: PPOState, raw_obs, gsum):
    """The running observation statistics after this rollout (every device's observations)."""
    if not c.hp.get("obs_norm"):
        return s.obs_stats
    d = raw_obs.reshape(-1, raw_obs.shape[-1]) - s.obs_stats.mean
    n = d.shape[0] * c.devices
    s1, s2 = gsum((d.sum(0), (d * d).sum(0)))
    return rlt.merge_obs_moments(s.obs_stats, n, s1, s2)


def _update(c: _Setup, s: PPOState, dev):
    """One PPO update on this device's E / D environments (`dev`: its index on the mesh)."""
    hp, env, T = c.hp, c.env, c.hp["rollout_len"]
    block = (lambda x: x) if c.devices == 1 else (lambda x: lax.dynamic_slice_in_dim(x, dev * c.local, c.local))
    rng, k_roll, k_perm = jax.random.split(s.rng, 3)
    s, tr = lax.scan(lambda s, k: _env_step(c, block, s, k), s._replace(rng=rng), jax.random.split(k_roll, T))
    _, _, last_value = _dist(env, s.params, _policy_obs(c, s, s.ts.obs), s.ts.legal, hp["activation"])
    dones = jnp.broadcast_to(tr["done"][..., None], tr["reward"].shape).astype(jnp.float32)
    adv, ret = gae(tr["reward"], tr["value"], dones, last_value, hp["gamma"], hp["gae_lambda"])
    # samples: every (step, env, agent) of this device; (T, E/D, A, ...) -> (T*E/D*A, ...)
    n = T * c.local * env.num_agents
    batch = {k: tr[k].reshape(n, *tr[k].shape[3:]) for k in ("obs", "legal", "action", "logp", "value")}
    batch.update(adv=adv.reshape(n), ret=ret.reshape(n))
    scale = lr_scale(c, s.progress)
    (params, opt_state), (pg, vf, ent) = _learn(c, s.params, s.opt_state, batch, k_perm, dev, scale)
    gsum = _reductions(c)[0]
    n_done, finished = gsum((tr["done"].sum(), tr["finished"].sum()))
    metrics = {"env_steps": jnp.int32(T * c.n_envs), "policy_loss": pg.mean(), "value_loss": vf.mean(),
               "entropy": ent.mean(), "episodes_done": n_done, "lr": hp["ppo_lr"] * scale,
               "train_return": jnp.where(n_done > 0, finished / jnp.maximum(n_done, 1), jnp.nan)}
    obs_stats = _obs_update(c, s, tr.get("raw_obs"), gsum)
    progress = rlt.spend(s.progress, T * c.n_envs, c.budget_steps)
    if c.devices > 1:  # every device gets every environment back: the state stays replicated
        gather = lambda x: lax.all_gather(x, AXIS, tiled=True)
        s = s._replace(**{k: jax.tree_util.tree_map(gather, getattr(s, k)) for k in ("env_state", "ts", "t", "ep_ret")})
    return s._replace(params=params, opt_state=opt_state, obs_stats=obs_stats, progress=progress), metrics


def make_ppo_trainer(env: rlt.Env, hp: dict, eval_episodes: int, mesh=None, *,
                     budget_steps: int = 10**9) -> rlt.Trainer:
    """PPO data-parallel over the devices of `mesh` (default: every device of every process):
    each device steps num_envs / D of the environments and learns on their samples; only
    gradients, a few loss scalars and (once per update) the environments' states cross devices.
    The learning rate anneals over budget_steps env steps or the wall clock the caller adds
    with rlt.spend_time, whichever is spent first."""
    mesh = population_mesh() if mesh is None else mesh
    D = mesh.size
    sizes = rlt.policy_sizes(env, hp["hidden"])
    tx = optax.chain(clip_actor_and_critic(hp["max_grad_norm"]), optax.adam(hp["ppo_lr"], eps=1e-5))
    c = _Setup(env, hp, sizes, tx, D, hp["num_envs"], hp["num_envs"] // D, budget_steps)
    if D == 1:
        update = lambda s: _update(c, s, 0)
    else:
        envs = P(AXIS)  # the environment axis is split over the devices (inputs replicated: a local slice)
        specs = PPOState(P(), P(), envs, envs, envs, envs, P(), P(), P())
        update = shard_map_unchecked(lambda s: _update(c, s, lax.axis_index(AXIS)), mesh=mesh, in_specs=(specs,),
                                     out_specs=(P(), P()))
    place = distributed.replicate
    init_jit, update_jit = jax.jit(lambda seed: _init(c, seed)), jax.jit(update)
    norm = bool(hp.get("obs_norm"))
    eval_jit = jax.jit(lambda p, st, k: rlt.evaluate_policy(env, p, k, eval_episodes, hp["activation"],
                                                            st if norm else None))
    n_params = sum(a * b + a for a, b in zip(sizes[1:], sizes[:-1]))
    measured: dict = {}

    def communication(s, ctx=None):
        if not measured:
            n_all = sum(x.size for x in jax.tree_util.tree_leaves(s.params))
            measured.update(update_communication(update_jit, place(s), n_params=n_all, mesh=mesh))
        return measured

    return rlt.Trainer(env, lambda seed: place(init_jit(seed)), lambda seed: None,
                       lambda s, ctx=None: update_jit(place(s)),
                       lambda s, k: eval_jit(place(s.params["actor"]), place(s.obs_stats), place(k)),
                       lambda s: s.params, n_params,
                       communication)


def update_communication(jitted, *args, n_params: int, mesh) -> dict:
    """distributed.communication of one PPO update (collectives counted as often as they run:
    comm_bytes_per_device is what one device sends in a whole update), plus comm_bytes_once, each
    collective of the program counted once (one rollout + one minibatch step)."""
    text = jitted.lower(*args).compile().as_text()
    out = hlo_communication(text, n_params=n_params, mesh=mesh)
    return {**out, "comm_bytes_once": sum(collective_bytes(text).values())}
