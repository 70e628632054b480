"""Batched generation where each row is its own population member: prefill + decode with a cache.

    gen = generate(params, cfg, prompts, prompt_lengths, max_new_tokens=64, key=key,
                   temperature=0.0, eos_ids=(eos,), noise_fn=es.noise, noise_args=(ctx, es_state),
                   member_ids=members)
    gen.tokens (B, max_new_tokens) int32, gen.lengths (B,), gen.finished (B,)

Rows. prompts (B, P) int32 are LEFT-padded (row b's real tokens are prompts[b, P - len_b:]);
row b evaluates member member_ids[b] (many rows per member = many prompts per member, many
members per batch). member_ids[b] < 0 means the unperturbed model (e.g. validation rows mixed
into the same batch). The members' noise is made once per call (vmap of noise_fn), before the
prefill, and every matmul adds only its rank-r correction (`eggroll.layers`); the shared weights
are one GEMM for the whole batch. With rows_per_member = k, rows come in groups of k consecutive
rows of one member: noise is made once per group and read once per group per step.

noise_fn. `noise_fn(member_id)` -> noise pytree, or, when `noise_args` (a tuple) is given,
`noise_fn(*noise_args, member_id)` (pass noise_fn=es.noise, noise_args=(ctx, es_state): then the
noise context and ES state are traced arguments and a new generation does not recompile; es.noise
draws same-shaped leaves in one vmapped gather, so a deep model compiles quickly). noise_fn=None: every row
is the plain model.

Decoding. Greedy when temperature == 0, else sampling from softmax(logits / temperature) (row
b's randomness depends only on (key, b, step)). A row stops after emitting any id in eos_ids;
the loop exits when every row has stopped or after max_new_tokens. Tokens after a row's stop
are `pad_id`; lengths counts the generated tokens including the EOS. `finished` is True for rows
that emitted an EOS (False = truncated at max_new_tokens).

Stop strings are NOT checked here: they are applied by the caller to the decoded text
(`truncate_at_stop`), because a stop string may span token boundaries. Give single-token stops
as eos_ids to end the row early inside the loop.

Models. The sampler only needs a `Decoder`: init_state(batch-free max_len) and
step(params, tokens (T,), positions (T,), noise, state, index) -> (logits of the last token
(vocab,), state), for ONE row; the sampler vmaps it. A transformer's state is its KV cache
(`transformer_decoder`); a recurrent model (RWKV-7) would return its recurrent state from
init_state and run its T tokens sequentially in step, skipping tokens with position < 0
(left padding) -- nothing in the loop below is transformer-specific.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .models import transformer as tfm
from .noise import Full, LowRank


class Generation(NamedTuple):
    tokens: jax.Array  # (B, max_new_tokens) int32, pad_id after the stop
    lengths: jax.Array  # (B,) int32 generated tokens incl. EOS
    finished: jax.Array  # (B,) bool: stopped by an EOS id


class Decoder(NamedTuple):
    """What the sampler needs from a model (one row; the sampler vmaps)."""

    init_state: Callable[[int], Any]  # max_len -> state
    step: Callable  # (params, tokens, positions, noise, state, index) -> (last logits (V,), state)


@functools.lru_cache(maxsize=None)  # one Decoder per (cfg, dtype): a static jit argument, so no recompiles
def transformer_decoder(cfg: tfm.TransformerConfig, cache_dtype=jnp.float32) -> Decoder:
    def step(params, tokens, positions, noise, state, index):
        h, state = tfm.hidden_states(params, cfg, tokens, positions, noise, state, index)
        return tfm.logits_from_hidden(params, cfg, h[-1], noise), state  # LM head on the last token only

    return Decoder(lambda max_len: tfm.init_cache(cfg, max_len, cache_dtype), step)


def _scale_noise(noise, keep):
    """Zero the perturbation of a row (keep False) by zeroing its handles' scale."""
    def f(n):
        if isinstance(n, (LowRank, Full)):
            return n._replace(scale=jnp.where(keep, n.scale, 0.0).astype(jnp.result_type(n.scale)))
        return n
    return jax.tree_util.tree_map(f, noise, is_leaf=lambda n: isinstance(n, (LowRank, Full)))


def row_noise(noise_fn, noise_args, member_ids):
    """Noise pytree with a leading axis over `member_ids` (None when noise_fn is None)."""
    if noise_fn is None:
        return None

    def one(m):
        n = noise_fn(jnp.maximum(m, 0)) if noise_args is None else noise_fn(*noise_args, jnp.maximum(m, 0))
        return _scale_noise(n, m >= 0)

    return jax.vmap(one)(member_ids)


def prompt_positions(prompt_lengths, width: int):
    """Positions of left-padded prompts (B, width): real tokens 0..len-1, padding negative."""
    return jnp.arange(width)[None, :] - (width - prompt_lengths[:, None])


def _pick(logits, key, temperature):
    """Next token of each row from logits (B, V)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(logits.shape[0]))
    z = logits.astype(jnp.float32) / temperature
    return jax.vmap(jax.random.categorical)(keys, z).astype(jnp.int32)


def _grouped_step(decoder: Decoder, batch: int, group: int, with_noise: bool):
    """decoder.step over rows (batch, ...) whose noise has one entry per `group` consecutive rows:
    an outer vmap over groups (noise axis 0) of an inner vmap over the rows of a group (noise
    shared), so each group's rank-r factors are read once per step, not once per row. The state
    stays (groups, group, ...)."""
    inner = jax.vmap(decoder.step, in_axes=(None, 0, 0, None, 0, None))
    outer = jax.vmap(inner, in_axes=(None, 0, 0, 0 if with_noise else None, 0, None))

    def step(params, tokens, positions, noise, state, index):
        split = (batch // group, group) + tokens.shape[1:]
        logits, state = outer(params, tokens.reshape(split), positions.reshape(split), noise, state, index)
        return logits.reshape(batch, -1), state

    return step


def decode(decoder: Decoder, params, prompts, prompt_lengths, noise, key, *, max_new_tokens: int,
           temperature: float, eos_ids: tuple, pad_id: int, rows_per_member: int = 1) -> Generation:
    """Traceable core of `generate` (call it inside your own jit). `noise` has a leading axis of
    batch // rows_per_member entries (one per group of consecutive rows), or is None."""
    b, p = prompts.shape
    k = rows_per_member if noise is not None else 1
    if b % k:
        raise ValueError(f"batch {b} is not a multiple of rows_per_member {k}")
    state = jax.vmap(jax.vmap(lambda _: decoder.init_state(p + max_new_tokens)))(jnp.zeros((b // k, k)))
    step = _grouped_step(decoder, b, k, noise is not None)
    logits, state = step(params, prompts, prompt_positions(prompt_lengths, p), noise, state, 0)
    eos = jnp.asarray(eos_ids, jnp.int32).reshape(-1)

    def body(carry):
        t, logits, state, out, lengths, finished = carry
        tok = _pick(logits, jax.random.fold_in(key, t), temperature)
        tok = jnp.where(finished, pad_id, tok)
        out = lax.dynamic_update_slice(out, tok[:, None], (0, t))
        lengths = lengths + (~finished).astype(jnp.int32)
        finished = finished | (tok[:, None] == eos[None, :]).any(-1)
        # the last step's logits are never used: skip the model on the final iteration
        logits, state = lax.cond(
            (t + 1 < max_new_tokens) & ~finished.all(),
            lambda: step(params, tok[:, None], (prompt_lengths + t)[:, None], noise, state, p + t),
            lambda: (logits, state))
        return t + 1, logits, state, out, lengths, finished

    def cond(carry):
        t, *_, finished = carry
        return (t < max_new_tokens) & ~finished.all()

    carry = (jnp.int32(0), logits, state, jnp.full((b, max_new_tokens), pad_id, jnp.int32),
             jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))
    _, _, _, out, lengths, finished = lax.while_loop(cond, body, carry)
    return Generation(out, lengths, finished)


@functools.partial(jax.jit, static_argnames=("cfg", "decoder", "max_new_tokens", "temperature", "eos_ids",
                                             "pad_id", "noise_fn", "rows_per_member"))
def _generate_jit(params, prompts, prompt_lengths, key, member_ids, noise_args, *, cfg, decoder, max_new_tokens,
                  temperature, eos_ids, pad_id, noise_fn, rows_per_member):
    decoder = decoder if decoder is not None else transformer_decoder(cfg)
    noise = row_noise(noise_fn, noise_args, member_ids[::rows_per_member])  # one entry per group of rows
    return decode(decoder, params, prompts, prompt_lengths, noise, key, max_new_tokens=max_new_tokens,
                  temperature=temperature, eos_ids=eos_ids, pad_id=pad_id, rows_per_member=rows_per_member)


def generate(params, cfg, prompts, prompt_lengths, *, max_new_tokens: int, key=None, temperature: float = 0.0,
             eos_ids=(), noise_fn=None, member_ids=None, noise_args=None, pad_id: int = 0,
             rows_per_member: int = 1, decoder: Decoder | None = None) -> Generation:
    """Jitted batched generation (see the module docstring). cfg: a TransformerConfig (or any
    hashable config when `decoder` is given). Compiles once per (cfg, shapes, max_new_tokens,
    temperature, eos_ids, pad_id, noise_fn, rows_per_member, decoder).

    rows_per_member = k > 1: rows come in groups of k consecutive rows of one member
    (member_ids[g*k : (g+1)*k] all equal; checked when member_ids is concrete); the noise is made
    once per group and each group's factors are read once per step -- faster when a member
    answers several prompts."""
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be (batch, prompt_len) int32, left-padded; got shape {prompts.shape}")
    b = prompts.shape[0]
    prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
    if prompt_lengths.shape != (b,):
        raise ValueError(f"prompt_lengths must have shape ({b},), got {prompt_lengths.shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if float(temperature) < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if member_ids is None:
        member_ids = jnp.zeros((b,), jnp.int32) if noise_fn is None else None
        if member_ids is None:
            raise ValueError("noise_fn needs member_ids: one member id per row (shape (batch,))")
    member_ids = jnp.asarray(member_ids, jnp.int32)
    if member_ids.shape != (b,):
        raise ValueError(f"member_ids must have shape ({b},), one per row; got {member_ids.shape}")
    if not isinstance(rows_per_member, int) or rows_per_member < 1 or b % rows_per_member:
        raise ValueError(f"rows_per_member must be a positive divisor of the batch {b}, got {rows_per_member!r}")
    if rows_per_member > 1 and not isinstance(member_ids, jax.core.Tracer):
        groups = np.asarray(member_ids).reshape(-1, rows_per_member)
        if (groups != groups[:, :1]).any():
            raise ValueError(f"rows_per_member={rows_per_member}: each group of {rows_per_member} consecutive rows "
                             "must share one member id (sort rows by member), or use rows_per_member=1")
    key = jax.random.PRNGKey(0) if key is None else key
    eos_ids = tuple(int(e) for e in (eos_ids if hasattr(eos_ids, "__iter__") else (eos_ids,)))
    return _generate_jit(params, prompts, prompt_lengths, key, member_ids, noise_args, cfg=cfg, decoder=decoder,
                         max_new_tokens=max_new_tokens, temperature=float(temperature), eos_ids=eos_ids,
                         pad_id=int(pad_id), noise_fn=noise_fn, rows_per_member=rows_per_member)


def truncate_at_stop(text: str, stops=()) -> tuple[str, bool]:
    """Cut decoded text at the first occurrence of any stop string -> (text, stopped)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def decode_rows(tokenizer, tokens) -> list[str]:
    return [tokenizer.decode(row) for row in np.asarray(tokens)]
