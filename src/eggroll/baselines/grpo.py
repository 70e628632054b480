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
> 0, group advantages, old log-probs from the sampling params (not recomputed when
minibatches = epochs = 1: old = stop_gradient(logp), ratio 1), `minibatches` x `epochs`
clipped updates, donated; log-probs only at the completion positions; optional bfloat16
compute and row chunks. On several devices (of one or several processes) it is data parallel: process p
samples and scores its 1/P of the prompts on its own devices, the batch stays sharded by rows
over every device, each device shuffles its own rows into minibatches, and every optimizer step
all-reduces the gradients and the token count (`data_parallel_update`: the same token-mean loss
over the union of the devices' minibatches). On one device nothing changes. The sampled
completions and the minibatch composition depend on the device layout (each device draws from
its own stream), so results agree with a one-device run in distribution, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from .. import distributed
from ..population import AXIS, population_mesh, shard_map_unchecked
from ..sampling import decode_rows
from ..tasks.diagnostics import generation_diagnostics
from ..tasks.finetune import (Rows, cast_params, fresh_copy, gather_bytes, generate_rows, local_mesh, local_view,
                              pack_rows, row_chunk, score_rows, unpack_rows)


class GRPOBatch(NamedTuple):
    """B sequences of prompt (left-padded, width P) + completion (width C), S = P + C."""

    tokens: jax.Array  # (B, S) int32
    positions: jax.Array  # (B, S) int32, < 0 on padding
    mask: jax.Array  # (B, C) float32: 1 on generated tokens (incl. EOS), 0 after the stop
    advantages: jax.Array  # (B,) float32
    old_logp: jax.Array | None  # (B, C) log-probs under the sampling policy; None: these params (ratio 1)
    ref_logp: jax.Array | None = None  # (B, C) log-probs under the reference policy (KL)


def group_advantages(rewards, eps: float = 1e-6):
    """rewards (P prompts, G samples) -> (P, G) group-normalised advantages (0 where all equal)."""
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 2:
        raise ValueError(f"rewards must be (prompts, samples per prompt), got shape {r.shape}")
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, keepdims=True)
    return (r - mean) / (std + eps)


def target_logprobs(logits, targets):
    """logits (n, V), targets (n,) -> (n,) log-softmax(logits)[targets], in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


def token_logprobs(logits, tokens):
    """logits (S, V) of one sequence, tokens (S,) -> (S-1,) log p(tokens[t+1] | tokens[:t+1])."""
    return target_logprobs(logits[:-1], tokens[1:])


def transformer_logprob_fn(cfg, compute_dtype=jnp.float32, last: int | None = None) -> Callable:
    """logprob_fn for eggroll.models.transformer (float32 master params cast to compute_dtype).
    last = C: only the log-probs of the last C tokens (C,) -- the LM head and the softmax run at
    those C positions only, not over the vocabulary at every prompt position (what
    `completion_logprobs` keeps anyway); None: all S-1."""
    from ..models import transformer as tfm

    def fn(params, tokens, positions):
        p = jax.tree_util.tree_map(lambda x: x.astype(compute_dtype), params)
        h, _ = tfm.hidden_states(p, cfg, tokens, positions)
        n = tokens.shape[0] - 1 if last is None else last
        return target_logprobs(tfm.logits_from_hidden(p, cfg, h[-n - 1:-1]), tokens[-n:])

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
    # no old log-probs: the batch was sampled by these very params (one optimizer step per
    # batch), so old = stop_gradient(logp): ratio 1, the same loss and gradient, no extra forward
    old = lax.stop_gradient(logp) if batch.old_logp is None else batch.old_logp
    ratio = jnp.exp(logp - old)
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
              clip_eps: float = 0.2, kl_coef: float = 0.0, minibatches: int = 1, epochs: int = 1,
              donate: bool = False) -> GRPO:
    """One GRPO update = `epochs` passes over the batch in `minibatches` shuffled minibatches,
    one optimizer step each. The batch size must be divisible by `minibatches`. A batch whose
    old_logp is None needs minibatches = epochs = 1 (see `grpo_loss`). donate: the update
    reuses the buffers of params and opt_state (the caller must not use them afterwards)."""
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
        check_old_logp(batch, minibatches, epochs)
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

    return GRPO(jax.jit(update, donate_argnums=(0, 1) if donate else ()), jax.jit(logprobs))


def check_old_logp(batch: GRPOBatch, minibatches: int, epochs: int) -> None:
    if batch.old_logp is None and minibatches * epochs > 1:
        raise ValueError("a GRPO batch without old log-probs needs minibatches = epochs = 1 (after the first "
                         "optimizer step the params are no longer the sampling policy)")


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
    init: Callable  # (key, params) -> GRPOState, replicated over every device of every process
    step: Callable  # (GRPOState, examples) -> (GRPOState, metrics dict)
    communication: Callable  # (GRPOState, prompts per step) -> bytes crossing devices / processes per step


def check_data_parallel(prompts: int, group_size: int, minibatches: int = 1) -> None:
    """One-line ValueErrors for a GRPO batch that does not split over every device of every
    process (nothing to check on one device)."""
    n_dev, procs = jax.device_count(), jax.process_count()
    if n_dev == 1:
        return
    if prompts % procs:
        raise ValueError(f"GRPO: {prompts} prompts per step must be a multiple of the {procs} processes")
    if (prompts * group_size) % (n_dev * minibatches):
        raise ValueError(f"GRPO: prompts x group_size = {prompts * group_size} rows must split into {minibatches} "
                         f"minibatch(es) on each of the {n_dev} devices")


def data_parallel_update(logprob_fn: Callable, optimizer: optax.GradientTransformation, completion_len: int, mesh, *,
                         clip_eps: float = 0.2, kl_coef: float = 0.0, minibatches: int = 1, epochs: int = 1,
                         donate: bool = False):
    """`make_grpo`'s update with the batch's rows split over `mesh` (one axis): per epoch each
    device shuffles its own rows into `minibatches` minibatches; for each optimizer step the
    gradients and token counts are summed over the devices (psum), so the step follows the
    token-mean loss of the union of the devices' minibatches. Jitted: (params, opt_state (both
    replicated), batch (rows sharded on the mesh axis), key) -> (params, opt_state, metrics)."""
    axis = mesh.axis_names[0]

    def local_loss(params, mb: GRPOBatch, n_tokens):
        logp = completion_logprobs(logprob_fn, params, mb.tokens, mb.positions, completion_len)
        loss, metrics = grpo_loss(logp, mb, clip_eps=clip_eps, kl_coef=kl_coef)
        share = jnp.maximum(mb.mask.sum(), 1.0) / n_tokens  # this device's token-mean -> its part of the global one
        return loss * share, jax.tree_util.tree_map(lambda v: v * share, metrics)

    def shard(params, opt_state, batch: GRPOBatch, key):
        b = batch.tokens.shape[0]
        if b % minibatches:
            raise ValueError(f"{b} sequences per device do not split into {minibatches} minibatches")
        check_old_logp(batch, minibatches, epochs)
        key = jax.random.fold_in(key, lax.axis_index(axis))
        perms = jnp.stack([jax.random.permutation(k, b) for k in jax.random.split(key, epochs)])

        def one_step(carry, idx):
            params, opt_state = carry
            mb = jax.tree_util.tree_map(lambda x: x[idx], batch)
            n_tokens = jnp.maximum(lax.psum(mb.mask.sum(), axis), 1.0)
            (_, metrics), grads = jax.value_and_grad(local_loss, has_aux=True)(params, mb, n_tokens)
            grads, metrics = lax.psum((grads, metrics), axis)
            metrics["grad_norm"] = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), metrics

        idx = perms.reshape(epochs * minibatches, b // minibatches)
        (params, opt_state), metrics = lax.scan(one_step, (params, opt_state), idx)
        return params, opt_state, jax.tree_util.tree_map(jnp.mean, metrics)

    return jax.jit(shard_map_unchecked(shard, mesh=mesh, in_specs=(P(), P(), P(axis), P()), out_specs=P()),
                   donate_argnums=(0, 1) if donate else ())


def grpo_finetuner(cfg, tokenizer, task, optimizer: optax.GradientTransformation, *, group_size: int,
                   prompt_len: int, max_new_tokens: int, temperature: float = 1.0, clip_eps: float = 0.2,
                   kl_coef: float = 0.0, ref_params=None, minibatches: int = 1, epochs: int = 1,
                   compute_dtype=None, max_rows: int | None = None, score_cache: bool = True,
                   reuse_logprobs: bool = True) -> GRPOFinetuner:
    """GRPO fine-tuner on the same harness. ref_params: the KL reference (needed if kl_coef > 0).
    One device: the update of `make_grpo`. Several devices (of one or several processes): data
    parallel (`_data_parallel_step`). compute_dtype (e.g. jnp.bfloat16): sampling and the
    log-prob forward run in it (masters, gradients and Adam stay float32). max_rows: rows
    sampled at once (memory; chunk c samples from fold_in(key, c)). reuse_logprobs: with
    minibatches = epochs = 1 the old log-probs are not recomputed (`grpo_loss`: identical
    update, one forward less). The update is donated (params and optimizer state in place)."""
    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2 samples per prompt, got {group_size}")
    if kl_coef and ref_params is None:
        raise ValueError("kl_coef > 0 needs ref_params (usually the starting checkpoint)")
    if not temperature > 0:
        raise ValueError(f"GRPO samples at temperature > 0, got {temperature}")
    logprob_fn = transformer_logprob_fn(cfg, compute_dtype or jnp.float32, last=max_new_tokens)
    opts = dict(clip_eps=clip_eps, kl_coef=kl_coef, minibatches=minibatches, epochs=epochs, donate=True)
    algo = make_grpo(logprob_fn, optimizer, max_new_tokens, **opts)
    place = distributed.replicate
    skip_old = reuse_logprobs and minibatches == epochs == 1
    sample = dict(max_new_tokens=max_new_tokens, temperature=temperature, eos_ids=tokenizer.eos_ids,
                  pad_id=tokenizer.pad_id, compute_dtype=compute_dtype)
    to_compute = jax.jit(lambda p: cast_params(p, compute_dtype))

    def rollout(params, examples, ids, lens, key, mesh):
        """Sample G completions of each prompt (rows p*G + g) in chunks of max_rows and score them."""
        n = len(ids)
        chunk = row_chunk(n, mesh.size, max_rows)
        params = local_view(to_compute(params) if compute_dtype is not None else params, mesh)
        gens = [generate_rows(params, cfg, ids[s:s + chunk], lens[s:s + chunk], mesh=mesh,
                              key=key if chunk == n else jax.random.fold_in(key, s // chunk), **sample)
                for s in range(0, n, chunk)]
        gen = Rows(*(np.concatenate(x) for x in zip(*gens)))
        texts = decode_rows(tokenizer, gen.tokens)
        scores, answers, _ = score_rows(task, texts, examples, np.repeat(np.arange(len(examples)), group_size),
                                        cache=score_cache)
        return gen, scores.reshape(-1, group_size), answers.reshape(-1, group_size)

    def init(key, params) -> GRPOState:
        return place(GRPOState(fresh_copy(params), fresh_copy(optimizer.init(params)), jnp.asarray(key)))

    def with_logprobs(batch: GRPOBatch, params, ref):
        old = None if skip_old else algo.logprobs(params, batch.tokens, batch.positions)
        return batch._replace(old_logp=old, ref_logp=algo.logprobs(ref, batch.tokens, batch.positions)
                              if ref is not None else None)

    if jax.device_count() > 1:
        mesh = population_mesh()
        update = data_parallel_update(logprob_fn, optimizer, max_new_tokens, mesh, **opts)
        step = _data_parallel_step(tokenizer, task, rollout, with_logprobs, update,
                                   place(ref_params) if kl_coef else None, group_size=group_size,
                                   prompt_len=prompt_len, minibatches=minibatches)
        return GRPOFinetuner(init, step, _communication(update, mesh, group_size, prompt_len, max_new_tokens,
                                                        minibatches * epochs, bool(kl_coef), not skip_old))

    def step(state: GRPOState, examples: Sequence[dict]):
        p = len(examples)
        key, k_sample, k_update = jax.random.split(state.key, 3)
        ids, lens = tokenizer.encode_batch([task.prompt(e) for e in examples], length=prompt_len)
        ids, lens = np.repeat(ids, group_size, axis=0), np.repeat(lens, group_size)  # row p*G + g
        gen, rewards, answers = rollout(state.params, examples, ids, lens, k_sample, local_mesh())
        batch = build_batch(ids, lens, gen.tokens, gen.lengths, group_advantages(rewards).reshape(-1), None)
        batch = with_logprobs(batch, state.params, ref_params if kl_coef else None)
        params, opt_state, m = algo.update(state.params, state.opt_state, batch, k_update)
        ids_t = [[None if a < 0 else a for a in row] for row in answers.T.tolist()]  # (samples, prompts)
        diag = generation_diagnostics(rewards.T, answers=ids_t, finished=np.asarray(gen.finished).reshape(p, group_size).T)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        return GRPOState(params, opt_state, key), {**diag, **m, "samples": p * group_size}

    return GRPOFinetuner(init, step, lambda state, prompts: {})


def _data_parallel_step(tokenizer, task, rollout, with_logprobs, update, ref_params, *, group_size: int,
                        prompt_len: int, minibatches: int) -> Callable:
    """The GRPO step over every device of every process: process p samples, scores and holds the
    rows of its prompts (a contiguous 1/P of them, spread over its devices, device d drawing from
    fold_in(fold_in(key, p), d)); `update` all-reduces the gradients; rewards, stops and answer ids
    (12 bytes per row) are all-gathered for the diagnostics."""
    mesh, local = population_mesh(), local_mesh()
    procs, me = jax.process_count(), jax.process_index()
    rows = NamedSharding(mesh, P(AXIS))
    split = jax.jit(lambda k: tuple(jax.random.split(k, 3)))

    def global_rows(x):  # this process's rows -> its block of a batch sharded over every device
        return None if x is None else jax.make_array_from_process_local_data(rows, np.asarray(x))

    def step(state: GRPOState, examples: Sequence[dict]):
        state, p, g = distributed.replicate(state), len(examples), group_size
        check_data_parallel(p, g, minibatches)
        key, k_sample, k_update = split(state.key)
        ids, lens = tokenizer.encode_batch([task.prompt(e) for e in examples], length=prompt_len)  # all: same counts
        q = p // procs
        mine = list(examples[me * q:(me + 1) * q])
        ids, lens = np.repeat(ids[me * q:(me + 1) * q], g, axis=0), np.repeat(lens[me * q:(me + 1) * q], g)
        gen, rewards, answers = rollout(state.params, mine, ids, lens, jax.random.fold_in(np.asarray(k_sample), me), local)
        batch = build_batch(ids, lens, gen.tokens, gen.lengths, np.asarray(group_advantages(rewards)).reshape(-1), None)
        batch = with_logprobs(GRPOBatch(*(global_rows(x) for x in batch)), state.params, ref_params)
        params, opt_state, m = update(state.params, state.opt_state, batch, k_update)
        packed = distributed.allgather_host(pack_rows(rewards, gen.finished.reshape(q, g), answers)).reshape(p, g, 3)
        scores, finished, answer_ids = unpack_rows(np.swapaxes(packed, 0, 1))  # (samples, prompts), as on one device
        diag = generation_diagnostics(scores, answers=answer_ids, finished=finished)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        return GRPOState(params, opt_state, key), {**diag, **m, "samples": p * g}

    return step


def _communication(update, mesh, group_size: int, prompt_len: int, completion_len: int, steps: int,
                   kl: bool, old: bool = True) -> Callable:
    """(state, prompts) -> bytes per GRPO step: the update's collectives measured from its compiled
    program (gradient all-reduce, once per optimizer step: x steps) + the diagnostics' gather."""
    def communication(state: GRPOState, prompts: int) -> dict:
        n = prompts * group_size
        rows = NamedSharding(mesh, P(AXIS))

        def spec(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=rows)

        c = completion_len
        batch = GRPOBatch(spec((n, prompt_len + c), jnp.int32), spec((n, prompt_len + c), jnp.int32),
                          spec((n, c), jnp.float32), spec((n,), jnp.float32), spec((n, c), jnp.float32) if old else None,
                          spec((n, c), jnp.float32) if kl else None)
        state = distributed.replicate(state)
        n_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(state.params))
        measured = distributed.communication(update, state.params, state.opt_state, batch, state.key, mesh=mesh,
                                             n_params=n_params)
        gather = gather_bytes(prompts // jax.process_count() * group_size * 12)
        return {k: measured[k] * steps + gather[k] for k in ("comm_bytes_per_process", "comm_bytes_sent_per_process")} | {
            "update_bytes_per_device_per_optimizer_step": measured["comm_bytes_per_device"], "optimizer_steps": steps,
            "comm_by_kind": measured["comm_by_kind"], "sgd_bf16_bytes": measured["sgd_bf16_bytes"],
            "gathered": "gradients (all-reduce), rewards, stops, answer ids per row"}

    return communication
