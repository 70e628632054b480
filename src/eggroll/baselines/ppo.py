"""PPO (clipped surrogate, GAE) on the eggroll.tasks.rl adapters: the RL recipe's gradient baseline.

One update = one jitted call: `num_envs` environments step `rollout_len` times (lax.scan, vmap over
environments), advantages by GAE(gamma, lambda), then `ppo_epochs` x `minibatches` Adam steps on

    L = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + vf_coef * (V - R)^2 / 2 - ent_coef * H,

rho = pi(a|s) / pi_old(a|s), advantages normalised per minibatch, gradients clipped to
max_grad_norm. Actor and critic are separate MLPs (models/mlp.py) with the ES policy's sizes and
activation. Discrete: a categorical over the legal logits. Continuous: a Gaussian around
tanh(actor(obs)) with a learned state-independent log std; the env receives the sample clipped to
[-1, 1]. The deterministic evaluation policy is argmax / tanh(actor(obs)) -- the same map the ES
policies use, so eval returns compare like for like. MPE: agents share the actor and critic
(parameter sharing; each agent's transitions are separate samples with its own reward).

Simplifications (stated, not hidden): episodes cut by the rollout horizon are treated as terminal
(no value bootstrap at truncation); no observation or reward normalisation (the ES runs have none
either); constant learning rate.

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

from ..models.mlp import init_mlp, mlp
from ..tasks import rl as rlt


class PPOState(NamedTuple):
    params: Any  # {"actor": mlp, "critic": mlp, "log_std": (num_outputs,)}
    opt_state: Any
    env_state: Any  # batched over num_envs
    ts: Any  # rlt.Step batched over num_envs
    t: jax.Array  # (num_envs,) steps into the current episode
    ep_ret: jax.Array  # (num_envs,) running team return
    rng: jax.Array


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


def _sample(env, key, head, log_std):
    if env.discrete:
        return jax.random.categorical(key, head).astype(jnp.int32)
    return head + jnp.exp(log_std) * jax.random.normal(key, head.shape)


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


def make_ppo_trainer(env: rlt.Env, hp: dict, eval_episodes: int) -> rlt.Trainer:
    E, T, act = hp["num_envs"], hp["rollout_len"], hp["activation"]
    sizes = rlt.policy_sizes(env, hp["hidden"])
    tx = optax.chain(optax.clip_by_global_norm(hp["max_grad_norm"]), optax.adam(hp["ppo_lr"], eps=1e-5))
    reset_v, step_v = jax.vmap(env.reset), jax.vmap(env.step)

    def init_fn(seed):
        key = jax.random.PRNGKey(seed)
        ka, kc, ke, kr = jax.random.split(key, 4)
        actor = init_mlp(ka, sizes)
        actor["layers"][-1]["w"] = actor["layers"][-1]["w"] * 0.01  # near-uniform initial policy
        params = {"actor": actor, "critic": init_mlp(kc, (*sizes[:-1], 1)),
                  "log_std": jnp.full((env.num_outputs,), -0.5)}
        env_state, ts = reset_v(jax.random.split(ke, E))
        return PPOState(params, tx.init(params), env_state, ts, jnp.zeros((E,), jnp.int32), jnp.zeros((E,)), kr)

    def env_step(s: PPOState, key):
        k_act, k_step, k_reset = jax.random.split(key, 3)
        head, log_std, value = _dist(env, s.params, s.ts.obs, s.ts.legal, act)
        action = _sample(env, k_act, head, log_std)
        logp = _log_prob(env, head, log_std, action)
        env_action = action if env.discrete else jnp.clip(action, -1, 1)
        env_state, ts = step_v(jax.random.split(k_step, E), s.env_state, env_action)
        t = s.t + 1
        done = ts.done | (t >= env.horizon)
        ep_ret = s.ep_ret + ts.reward.mean(-1)
        fresh_state, fresh_ts = reset_v(jax.random.split(k_reset, E))
        pick = lambda new, old: jnp.where(done.reshape((E,) + (1,) * (new.ndim - 1)), new, old)
        env_state = jax.tree_util.tree_map(pick, fresh_state, env_state)
        next_ts = jax.tree_util.tree_map(pick, fresh_ts, ts)
        trans = {"obs": s.ts.obs, "legal": s.ts.legal, "action": action, "logp": logp, "value": value,
                     "reward": ts.reward, "done": done, "finished": jnp.where(done, ep_ret, 0.0)}
        s = s._replace(env_state=env_state, ts=next_ts, t=jnp.where(done, 0, t), ep_ret=jnp.where(done, 0.0, ep_ret))
        return s, trans

    def loss_fn(params, b):
        head, log_std, value = _dist(env, params, b["obs"], b["legal"], act)
        logp = _log_prob(env, head, log_std, b["action"])
        ratio = jnp.exp(logp - b["logp"])
        adv = (b["adv"] - b["adv"].mean()) / (b["adv"].std() + 1e-8)
        pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - hp["clip_eps"], 1 + hp["clip_eps"]) * adv).mean()
        vf = 0.5 * jnp.mean((value - b["ret"]) ** 2)
        ent = _entropy(env, head, log_std).mean()
        return pg + hp["vf_coef"] * vf - hp["ent_coef"] * ent, (pg, vf, ent)

    def update(s: PPOState):
        rng, k_roll, k_perm = jax.random.split(s.rng, 3)
        s, tr = lax.scan(env_step, s._replace(rng=rng), jax.random.split(k_roll, T))
        _, _, last_value = _dist(env, s.params, s.ts.obs, s.ts.legal, act)
        dones = jnp.broadcast_to(tr["done"][..., None], tr["reward"].shape).astype(jnp.float32)
        adv, ret = gae(tr["reward"], tr["value"], dones, last_value, hp["gamma"], hp["gae_lambda"])
        # samples: every (step, env, agent); (T, E, A, ...) -> (T*E*A, ...)
        n = T * E * env.num_agents
        batch = {k: tr[k].reshape(n, *tr[k].shape[3:]) for k in ("obs", "legal", "action", "logp", "value")}
        batch.update(adv=adv.reshape(n), ret=ret.reshape(n))
        mb = n // hp["minibatches"]

        def epoch(carry, key):
            params, opt_state = carry
            perm = jax.random.permutation(key, n)[: mb * hp["minibatches"]].reshape(hp["minibatches"], mb)

            def minibatch(carry, idx):
                params, opt_state = carry
                grads, aux = jax.grad(loss_fn, has_aux=True)(params, jax.tree_util.tree_map(lambda x: x[idx], batch))
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), aux

            return lax.scan(minibatch, (params, opt_state), perm)

        (params, opt_state), (pg, vf, ent) = lax.scan(epoch, (s.params, s.opt_state),
                                                      jax.random.split(k_perm, hp["ppo_epochs"]))
        n_done = tr["done"].sum()
        metrics = {"env_steps": jnp.int32(T * E), "policy_loss": pg.mean(), "value_loss": vf.mean(),
                   "entropy": ent.mean(), "episodes_done": n_done,
                   "train_return": jnp.where(n_done > 0, tr["finished"].sum() / jnp.maximum(n_done, 1), jnp.nan)}
        return s._replace(params=params, opt_state=opt_state), metrics

    init_jit, update_jit = jax.jit(init_fn), jax.jit(update)
    eval_jit = jax.jit(lambda p, k: rlt.evaluate_policy(env, p, k, eval_episodes, act))
    n_params = sum(a * b + a for a, b in zip(sizes[1:], sizes[:-1]))
    return rlt.Trainer(env, init_jit, update_jit, lambda s, k: eval_jit(s.params["actor"], k),
                       lambda s: s.params, n_params)
