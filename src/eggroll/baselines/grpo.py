"""GRPO (Shao et al. 2024, DeepSeekMath): the backprop baseline for LLM fine-tuning with rewards.

Per prompt j, G completions y_j1..y_jG are sampled (temperature > 0) and scored r_jg. Their
group-relative advantage is

    A_jg = (r_jg - mean_g r_jg) / (std_g r_jg + eps)        (std over the group, ddof 0)

and every completion token t gets the PPO-clipped surrogate with importance ratio
rho_t = exp(logp_t - logp_old_t) (logp_old: the policy that sampled, frozen for the update),

    loss_t = -min(rho_t A, clip(rho_t, 1 - clip_eps, 1 + clip_eps) A) + kl_coef * KL_t
    KL_t   = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1     (k3 estimator, >= 0)

averaged over all completion tokens of the batch ("token-mean": sum of loss_t over tokens /
number of tokens, so long completions are not down-weighted per token). The reference policy
(for KL) is usually the starting checkpoint. Master weights stay float32; the forward may run
in a lower `compute_dtype`. The optimizer is any optax transformation.

The model enters through `logprob_fn(params, tokens (S,), positions (S,)) -> log-probs (S-1,)`
of tokens[1:] given their prefix, for ONE sequence (see `transformer_logprob_fn`).

`grpo_finetuner` is the fine-tuning loop on the same sampler, tokenizer adapter and Task as the
EGGROLL fine-tuner (`tasks.finetune.es_finetuner`): P prompts, G samples each at temperature
> 0, group advantages, old log-probs from the sampling params, `minibatches` x `epochs` clipped
updates.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..sampling import decode_rows, generate
from ..tasks.diagnostics import generation_diagnostics


class GRPOBatch(NamedTuple):
    """B sequences of prompt (left-padded, width P) + completion (width C), S = P + C."""

    tokens: jax.Array  # (B, S) int32
    positions: jax.Array  # (B, S) int32, < 0 on padding
    mask: jax.Array  # (B, C) float32: 1 on generated tokens (incl. EOS), 0 after the stop
    advantages: jax.Array  # (B,) float32
    old_logp: jax.Array  # (B, C) log-probs under the sampling policy
    ref_logp: jax.Array | None = None  # (B, C) log-probs under the reference policy (KL)


def group_advantages(rewards, eps: float = 1e-6):
    """rewards (P prompts, G samples) -> (P, G) group-normalised advantages (0 where all equal)."""
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 2:
        raise ValueError(f"rewards must be (prompts, samples per prompt), got shape {r.shape}")
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, keepdims=True)
    return (r - mean) / (std + eps)


def token_logprobs(logits, tokens):
    """logits (S, V) of one sequence, tokens (S,) -> (S-1,) log p(tokens[t+1] | tokens[:t+1])."""
    logp = jax.nn.log_softmax(logits[:-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[1:, None], axis=-1)[:, 0]


def transformer_logprob_fn(cfg, compute_dtype=jnp.float32) -> Callable:
    """logprob_fn for eggroll.models.transformer (float32 master params cast to compute_dtype)."""
    from ..models import transformer as tfm

    def fn(params, tokens, positions):
        p = jax.tree_util.tree_map(lambda x: x.astype(compute_dtype), params)
        logits, _ = tfm.forward(p, cfg, tokens, positions)
        return token_logprobs(logits, tokens)

    return fn


def completion_logprobs(logprob_fn, params, tokens, positions, completion_len: int):
    """(B, S) sequences -> (B, C) log-probs of their last C tokens (the completions)."""
    lp = jax.vmap(logprob_fn, in_axes=(None, 0, 0))(params, tokens, positions)  # (B, S-1)
    return lp[:, -completion_len:]


def grpo_loss(logp, batch: GRPOBatch, *, clip_eps: float = 0.2, kl_coef: float = 0.0):
    """Token-mean clipped surrogate (+ KL) from completion log-probs logp (B, C) -> (loss, metrics)."""
    mask = batch.mask.astype(jnp.float32)
    n_tok = jnp.maximum(mask.sum(), 1.0)
    adv = batch.advantages.astype(jnp.float32)[:, None]
    ratio = jnp.exp(logp - batch.old_logp)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_tok = -jnp.minimum(ratio * adv, clipped * adv)
    metrics = {"clip_frac": ((jnp.abs(ratio - 1.0) > clip_eps) * mask).sum() / n_tok,
               "ratio_mean": (ratio * mask).sum() / n_tok}
    if kl_coef and batch.ref_logp is not None:
        d = batch.ref_logp - logp
        kl = jnp.exp(d) - d - 1.0
        per_tok = per_tok + kl_coef * kl
        metrics["kl"] = (kl * mask).sum() / n_tok
    loss = (per_tok * mask).sum() / n_tok
    metrics["loss"] = loss
    return loss, metrics


class GRPO(NamedTuple):
    update: Callable  # (params, opt_state, batch, key) -> (params, opt_state, metrics); jitted
    logprobs: Callable  # (params, tokens, positions) -> (B, C) completion log-probs; jitted


def make_grpo(logprob_fn: Callable, optimizer: optax.GradientTransformation, completion_len: int, *,
              clip_eps: float = 0.2, kl_coef: float = 0.0, minibatches: int = 1, epochs: int = 1) -> GRPO:
    """One GRPO update = `epochs` passes over the batch in `minibatches` shuffled minibatches,
    one optimizer step each. The batch size must be divisible by `minibatches`."""
    if minibatches < 1 or epochs < 1:
        raise ValueError(f"minibatches and epochs must be >= 1, got {minibatches}, {epochs}")
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")

    def loss_fn(params, mb: GRPOBatch):
        logp = completion_logprobs(logprob_fn, params, mb.tokens, mb.positions, completion_len)
        return grpo_loss(logp, mb, clip_eps=clip_eps, kl_coef=kl_coef)

    def update(params, opt_state, batch: GRPOBatch, key):
        b = batch.tokens.shape[0]
        if b % minibatches:
            raise ValueError(f"batch of {b} sequences does not split into {minibatches} minibatches")
        size = b // minibatches

        def one_step(carry, idx):
            params, opt_state = carry
            mb = jax.tree_util.tree_map(lambda x: None if x is None else x[idx], batch,
                                        is_leaf=lambda x: x is None)
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
            metrics["grad_norm"] = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), metrics

        perms = jnp.stack([jax.random.permutation(k, b) for k in jax.random.split(key, epochs)])
        idx = perms.reshape(epochs * minibatches, size)
        (params, opt_state), metrics = jax.lax.scan(one_step, (params, opt_state), idx)
        return params, opt_state, jax.tree_util.tree_map(jnp.mean, metrics)

    def logprobs(params, tokens, positions):
        return completion_logprobs(logprob_fn, params, tokens, positions, completion_len)

    return GRPO(jax.jit(update), jax.jit(logprobs))


def build_batch(prompts, prompt_lengths, completions, completion_lengths, advantages, old_logp,
                ref_logp=None) -> GRPOBatch:
    """Assemble a GRPOBatch from sampler output: prompts (B, P) left-padded, completions (B, C)."""
    prompts = jnp.asarray(prompts, jnp.int32)
    completions = jnp.asarray(completions, jnp.int32)
    p, c = prompts.shape[1], completions.shape[1]
    plen = jnp.asarray(prompt_lengths, jnp.int32)[:, None]
    positions = jnp.concatenate([jnp.arange(p)[None, :] - (p - plen), plen + jnp.arange(c)[None, :]], axis=1)
    mask = (jnp.arange(c)[None, :] < jnp.asarray(completion_lengths)[:, None]).astype(jnp.float32)
    return GRPOBatch(jnp.concatenate([prompts, completions], axis=1), positions.astype(jnp.int32), mask,
                     jnp.asarray(advantages, jnp.float32), old_logp, ref_logp)


class GRPOState(NamedTuple):
    params: Any
    opt_state: Any
    key: jax.Array


class GRPOFinetuner(NamedTuple):
    init: Callable  # (key, params) -> GRPOState
    step: Callable  # (GRPOState, examples) -> (GRPOState, metrics dict)


def grpo_finetuner(cfg, tokenizer, task, optimizer: optax.GradientTransformation, *, group_size: int,
                   prompt_len: int, max_new_tokens: int, temperature: float = 1.0, clip_eps: float = 0.2,
                   kl_coef: float = 0.0, ref_params=None, minibatches: int = 1, epochs: int = 1) -> GRPOFinetuner:
    """GRPO fine-tuner on the same harness. ref_params: the KL reference (needed if kl_coef > 0)."""
    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2 samples per prompt, got {group_size}")
    if kl_coef and ref_params is None:
        raise ValueError("kl_coef > 0 needs ref_params (usually the starting checkpoint)")
    if not temperature > 0:
        raise ValueError(f"GRPO samples at temperature > 0, got {temperature}")
    logprob_fn = transformer_logprob_fn(cfg)
    algo = make_grpo(logprob_fn, optimizer, max_new_tokens, clip_eps=clip_eps, kl_coef=kl_coef,
                              minibatches=minibatches, epochs=epochs)

    def init(key, params) -> GRPOState:
        return GRPOState(params, optimizer.init(params), jnp.asarray(key))

    def step(state: GRPOState, examples: Sequence[dict]):
        p = len(examples)
        key, k_sample, k_update = jax.random.split(state.key, 3)
        ids, lens = tokenizer.encode_batch([task.prompt(e) for e in examples], length=prompt_len)
        ids, lens = np.repeat(ids, group_size, axis=0), np.repeat(lens, group_size)  # row p*G + g
        gen = generate(state.params, cfg, ids, lens, max_new_tokens=max_new_tokens, key=k_sample,
                       temperature=temperature, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
        texts = decode_rows(tokenizer, gen.tokens)
        rewards = task.score_batch(texts, [e for e in examples for _ in range(group_size)]).reshape(p, group_size)
        adv = group_advantages(rewards).reshape(-1)
        batch = build_batch(ids, lens, gen.tokens, gen.lengths, adv, None)
        old = algo.logprobs(state.params, batch.tokens, batch.positions)
        ref = algo.logprobs(ref_params, batch.tokens, batch.positions) if kl_coef else None
        batch = batch._replace(old_logp=old, ref_logp=ref)
        params, opt_state, m = algo.update(state.params, state.opt_state, batch, k_update)
        answers = [[task.answer(texts[q * group_size + g]) for q in range(p)] for g in range(group_size)]
        diag = generation_diagnostics(rewards.T, answers=answers,
                                      finished=np.asarray(gen.finished).reshape(p, group_size).T)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        return GRPOState(params, opt_state, key), {**diag, **m, "samples": p * group_size}

    return GRPOFinetuner(init, step)
