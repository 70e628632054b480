"""Decoder-only transformer of the Qwen2 / Qwen2.5 / Qwen3 / Llama-3 family, perturbation-aware.

RMSNorm, rotary position embeddings (RoPE, with Llama-3 / linear scaling), grouped-query
attention, SwiGLU MLP, optional q/k/v bias (Qwen2), optional per-head q/k RMSNorm (Qwen3),
tied or untied embeddings. Every matmul goes through `eggroll.layers` (linear / embed / param),
so with `noise` (a pytree of noise handles shaped like params, e.g. `es.noise(state, member)`)
member i computes x W^T + s (x B_i) A_i^T: only the rank-r correction is per member.

    cfg = TransformerConfig(vocab_size=..., hidden_size=..., ...)
    params = init_params(key, cfg)                         # float32 pytree, HF-like names
    logits, _ = forward(params, cfg, tokens, positions)    # ONE sequence: tokens (T,) int32
    cache = init_cache(cfg, max_len)                       # KV cache of one sequence
    logits, cache = forward(params, cfg, tokens, positions, noise, cache, cache_index)

The caller vmaps over rows (and members). Params mirror the Hugging Face state dict:
params["model"]["layers"][i]["self_attn"]["q_proj"]["weight"] is
"model.layers.{i}.self_attn.q_proj.weight"; "lm_head" is absent when embeddings are tied.
Linear weights are (out, in) as in PyTorch.

Padding: a token with position < 0 is padding. It is never attended to (as a key) and its own
output is meaningless. Left-padded prompts use positions arange(P) - (P - length), i.e. the
real tokens get 0..length-1 and the pads negative numbers.

KV cache (one sequence): k, v (layers, S, kv_heads, head_dim) and pos (S,) int32, -1 = empty.
forward with cache writes the T new keys/values at slots [cache_index, cache_index + T) and
the query at slot q attends to slots s <= q whose pos >= 0 (so prefill, then one token per
decode step, gives the same result as recomputing the whole sequence).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .. import layers


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Static architecture (hashable: used as a static jit argument).

    rope_scaling: None, or a tuple of (key, value) pairs from HF's rope_scaling dict, e.g.
    (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
     ("original_max_position_embeddings", 8192), ("rope_type", "llama3")).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 / Qwen2.5: bias on q, k, v projections
    o_bias: bool = False  # Llama attention_bias=True also biases o_proj
    mlp_bias: bool = False  # Llama mlp_bias
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of q and k, before RoPE
    max_position: int = 32768
    rope_scaling: tuple | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if isinstance(self.rope_scaling, dict):  # accept a dict, store hashable
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))


class KVCache(NamedTuple):
    """KV cache of one sequence (the sampler vmaps it over rows)."""

    k: jax.Array  # (layers, S, kv_heads, head_dim)
    v: jax.Array  # (layers, S, kv_heads, head_dim)
    pos: jax.Array  # (S,) int32 position of each slot, -1 = empty / padding


def init_cache(cfg: TransformerConfig, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_layers, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((max_len,), -1, jnp.int32))


def _linear_params(key, n_out, n_in, bias, std):
    p = {"weight": std * jax.random.normal(key, (n_out, n_in), jnp.float32)}
    if bias:
        p["bias"] = jnp.zeros((n_out,), jnp.float32)
    return p


def init_params(key, cfg: TransformerConfig, std: float = 0.02):
    """Random float32 params (normal(0, std) matrices, unit norms, zero biases)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    keys = jax.random.split(key, cfg.num_layers + 2)
    layer_list = []
    for lk in keys[:cfg.num_layers]:
        k = jax.random.split(lk, 7)
        attn = {
            "q_proj": _linear_params(k[0], cfg.num_heads * hd, d, cfg.qkv_bias, std),
            "k_proj": _linear_params(k[1], cfg.num_kv_heads * hd, d, cfg.qkv_bias, std),
            "v_proj": _linear_params(k[2], cfg.num_kv_heads * hd, d, cfg.qkv_bias, std),
            "o_proj": _linear_params(k[3], d, cfg.num_heads * hd, cfg.o_bias, std),
        }
        if cfg.qk_norm:
            attn["q_norm"] = {"weight": jnp.ones((hd,), jnp.float32)}
            attn["k_norm"] = {"weight": jnp.ones((hd,), jnp.float32)}
        layer_list.append({
            "input_layernorm": {"weight": jnp.ones((d,), jnp.float32)},
            "self_attn": attn,
            "post_attention_layernorm": {"weight": jnp.ones((d,), jnp.float32)},
            "mlp": {
                "gate_proj": _linear_params(k[4], cfg.intermediate_size, d, cfg.mlp_bias, std),
                "up_proj": _linear_params(k[5], cfg.intermediate_size, d, cfg.mlp_bias, std),
                "down_proj": _linear_params(k[6], d, cfg.intermediate_size, cfg.mlp_bias, std),
            },
        })
    params = {"model": {
        "embed_tokens": {"weight": std * jax.random.normal(keys[-2], (cfg.vocab_size, d), jnp.float32)},
        "layers": layer_list,
        "norm": {"weight": jnp.ones((d,), jnp.float32)},
    }}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"weight": std * jax.random.normal(keys[-1], (cfg.vocab_size, d), jnp.float32)}
    return params


# ---------------------------------------------------------------------------------------------
# building blocks (one sequence)


def _lin(p, n, x):
    """Perturbed x @ W^T (+ b) for a {"weight", "bias"?} dict p and its noise dict n."""
    y = layers.linear(p["weight"], x, n["weight"])
    if "bias" in p:
        y = y + layers.param(p["bias"], n["bias"]).astype(y.dtype)
    return y


def rms_norm(x, weight, eps):
    """HF RMSNorm: normalise in float32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_inv_freq(cfg: TransformerConfig) -> jax.Array:
    """Inverse frequencies (head_dim // 2,), with HF's "llama3" / "linear" scaling."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    rs = dict(cfg.rope_scaling or ())
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / rs["factor"]
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        # long wavelengths (low freq) are divided by factor, short ones kept, a smooth blend between
        scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return jnp.where(medium, blended, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, linear, llama3")


def apply_rope(x, positions, inv_freq):
    """x (T, heads, hd) rotated by angle position * inv_freq (HF "rotate_half" layout)."""
    ang = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (T, hd/2)
    cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _attention(q, k, v, q_slots, k_pos):
    """q (T, H, hd); k, v (S, KVH, hd); q_slots (T,) slot index of each query; k_pos (S,).

    Query at slot q sees key slot s iff s <= q and k_pos[s] >= 0. Softmax in float32."""
    t, h, hd = q.shape
    s, kvh, _ = k.shape
    g = h // kvh
    qg = q.reshape(t, kvh, g, hd)
    scores = jnp.einsum("tkgd,skd->kgts", qg, k).astype(jnp.float32) / math.sqrt(hd)
    visible = (jnp.arange(s)[None, :] <= q_slots[:, None]) & (k_pos[None, :] >= 0)  # (T, S)
    scores = jnp.where(visible[None, None], scores, -jnp.inf)
    # rows with nothing visible (padding queries) would be all -inf: keep them finite
    scores = jnp.where(visible.any(-1)[None, None, :, None], scores, 0.0)
    w = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("kgts,skd->tkgd", w, v).reshape(t, h * hd)


def _layer(p, n, cfg, x, positions, inv_freq, kv, layer_idx, cache_index):
    """One decoder block. kv = (k_all, v_all, pos_all, q_slots) or None (no cache)."""
    t = x.shape[0]
    hd = cfg.head_dim
    a, na = p["self_attn"], n["self_attn"]
    h = rms_norm(x, layers.param(p["input_layernorm"]["weight"], n["input_layernorm"]["weight"]), cfg.rms_norm_eps)
    q = _lin(a["q_proj"], na["q_proj"], h).reshape(t, cfg.num_heads, hd)
    k = _lin(a["k_proj"], na["k_proj"], h).reshape(t, cfg.num_kv_heads, hd)
    v = _lin(a["v_proj"], na["v_proj"], h).reshape(t, cfg.num_kv_heads, hd)
    if cfg.qk_norm:
        q = rms_norm(q, layers.param(a["q_norm"]["weight"], na["q_norm"]["weight"]), cfg.rms_norm_eps)
        k = rms_norm(k, layers.param(a["k_norm"]["weight"], na["k_norm"]["weight"]), cfg.rms_norm_eps)
    rope_pos = jnp.maximum(positions, 0)
    q, k = apply_rope(q, rope_pos, inv_freq), apply_rope(k, rope_pos, inv_freq)
    if kv is None:
        k_all, v_all, k_pos, q_slots, new_kv = k, v, positions, jnp.arange(t), None
    else:
        ck, cv, k_pos, q_slots = kv
        ck = lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (layer_idx, cache_index, 0, 0))
        cv = lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (layer_idx, cache_index, 0, 0))
        k_all, v_all, new_kv = ck[layer_idx], cv[layer_idx], (ck, cv, k_pos, q_slots)
    o = _attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), q_slots, k_pos)
    x = x + _lin(a["o_proj"], na["o_proj"], o)
    m, nm = p["mlp"], n["mlp"]
    h = rms_norm(x, layers.param(p["post_attention_layernorm"]["weight"], n["post_attention_layernorm"]["weight"]),
                 cfg.rms_norm_eps)
    h = jax.nn.silu(_lin(m["gate_proj"], nm["gate_proj"], h)) * _lin(m["up_proj"], nm["up_proj"], h)
    return x + _lin(m["down_proj"], nm["down_proj"], h), new_kv


def hidden_states(params, cfg: TransformerConfig, tokens, positions, noise=None, cache=None, cache_index=None):
    """Final-norm hidden states (T, hidden) of one sequence, and the updated cache (or None)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    if tokens.ndim != 1 or positions.shape != tokens.shape:
        raise ValueError(f"forward computes one sequence: tokens (T,) and positions (T,), got "
                         f"{tokens.shape} and {positions.shape}; vmap over rows")
    noise = layers.noise_like(params, noise)
    mp, mn = params["model"], noise["model"]
    x = layers.embed(mp["embed_tokens"]["weight"], tokens, mn["embed_tokens"]["weight"])
    inv_freq = rope_inv_freq(cfg)
    kv = None
    if cache is not None:
        if cache_index is None:
            raise ValueError("forward with a cache needs cache_index (first slot to write)")
        t = tokens.shape[0]
        k_pos = lax.dynamic_update_slice(cache.pos, positions, (cache_index,))
        kv = (cache.k, cache.v, k_pos, cache_index + jnp.arange(t))
    for i, (p, n) in enumerate(zip(mp["layers"], mn["layers"])):
        x, kv = _layer(p, n, cfg, x, positions, inv_freq, kv, i, cache_index)
    x = rms_norm(x, layers.param(mp["norm"]["weight"], mn["norm"]["weight"]), cfg.rms_norm_eps)
    new_cache = None if kv is None else KVCache(kv[0], kv[1], kv[2])
    return x, new_cache


def logits_from_hidden(params, cfg: TransformerConfig, h, noise=None):
    """LM head (tied: the embedding matrix, with the embedding's noise). h (..., hidden)."""
    noise = layers.noise_like(params, noise)
    if cfg.tie_embeddings:
        return layers.linear(params["model"]["embed_tokens"]["weight"], h, noise["model"]["embed_tokens"]["weight"])
    return layers.linear(params["lm_head"]["weight"], h, noise["lm_head"]["weight"])


def forward(params, cfg: TransformerConfig, tokens, positions, noise=None, cache=None, cache_index=None):
    """Logits (T, vocab) of one sequence and the updated cache (None without a cache)."""
    h, cache = hidden_states(params, cfg, tokens, positions, noise, cache, cache_index)
    return logits_from_hidden(params, cfg, h, noise), cache


def num_params(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
