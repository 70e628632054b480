"""Batched generation where each row is its own population member: prefill + decode with a cache.

    gen = generate(params, cfg, prompts, prompt_lengths, max_new_tokens=64, key=key,
                   temperature=0.0, eos_ids=(eos,), noise_fn=es.noise, noise_args=es_state,
                   member_ids=members)
    gen.tokens (B, max_new_tokens) int32, gen.lengths (B,), gen.finished (B,)

Rows. prompts (B, P) int32 are LEFT-padded (row b's real tokens are prompts[b, P - len_b:]);
row b evaluates member member_ids[b] (many rows per member = many prompts per member, many
members per batch). member_ids[b] < 0 means the unperturbed model (e.g. validation rows mixed
into the same batch). The member's noise is made once per call (vmap of noise_fn over the rows)
and every matmul adds only its rank-r correction (`eggroll.layers`); the shared weights are one
GEMM for the whole batch.

noise_fn. `noise_fn(member_id)` -> noise pytree, or, when `noise_args` is given,
`noise_fn(noise_args, member_id)` (pass noise_fn=es.noise, noise_args=es_state: then the ES
state is a traced argument and a new generation does not recompile). noise_fn=None: every row
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
    """Noise pytree with a leading row axis (None when noise_fn is None)."""
    if noise_fn is None:
        return None

    def one(m):
        n = noise_fn(jnp.maximum(m, 0)) if noise_args is None else noise_fn(noise_args, jnp.maximum(m, 0))
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


def decode(decoder: Decoder, params, prompts, prompt_lengths, noise, key, *, max_new_tokens: int,
           temperature: float, eos_ids: tuple, pad_id: int) -> Generation:
    """Traceable core of `generate` (call it inside your own jit; noise has a leading row axis)."""
    b, p = prompts.shape
    state = jax.vmap(lambda _: decoder.init_state(p + max_new_tokens))(jnp.arange(b))
    noise_axes = None if noise is None else 0
    step = jax.vmap(decoder.step, in_axes=(None, 0, 0, noise_axes, 0, None))
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
                                             "pad_id", "noise_fn"))
def _generate_jit(params, prompts, prompt_lengths, key, member_ids, noise_args, *, cfg, decoder, max_new_tokens,
                  temperature, eos_ids, pad_id, noise_fn):
    decoder = decoder if decoder is not None else transformer_decoder(cfg)
    noise = row_noise(noise_fn, noise_args, member_ids)
    return decode(decoder, params, prompts, prompt_lengths, noise, key, max_new_tokens=max_new_tokens,
                  temperature=temperature, eos_ids=eos_ids, pad_id=pad_id)


def generate(params, cfg, prompts, prompt_lengths, *, max_new_tokens: int, key=None, temperature: float = 0.0,
             eos_ids=(), noise_fn=None, member_ids=None, noise_args=None, pad_id: int = 0,
             decoder: Decoder | None = None) -> Generation:
    """Jitted batched generation (see the module docstring). cfg: a TransformerConfig (or any
    hashable config when `decoder` is given). Compiles once per (cfg, shapes, max_new_tokens,
    temperature, eos_ids, pad_id, noise_fn, decoder)."""
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
    key = jax.random.PRNGKey(0) if key is None else key
    eos_ids = tuple(int(e) for e in (eos_ids if hasattr(eos_ids, "__iter__") else (eos_ids,)))
    return _generate_jit(params, prompts, prompt_lengths, key, member_ids, noise_args, cfg=cfg, decoder=decoder,
                         max_new_tokens=max_new_tokens, temperature=float(temperature), eos_ids=eos_ids,
                         pad_id=int(pad_id), noise_fn=noise_fn)


def truncate_at_stop(text: str, stops=()) -> tuple[str, bool]:
    """Cut decoded text at the first occurrence of any stop string -> (text, stopped)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
