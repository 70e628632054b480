"""Generation throughput with per-member noise vs plain batched generation of the same batch.

Both sides run `sampling.generate` on the same random-initialised transformer, the same
left-padded prompts (B = members x prompts_per_member rows) and the same number of new tokens
(no EOS, so every row decodes max_new_tokens). The perturbed side gives row b member b //
prompts_per_member and makes its noise inside the jitted call (es.noise per member: same-shaped leaves in one vmapped gather, as a
training generation would), with rows_per_member = prompts_per_member (one set of factors per
member); `per_row_over_plain` is the same with the factors looked up per row
(rows_per_member=1). The plain side passes noise_fn=None. Timed in interleaved rounds
in one process (the timing helper of `bench throughput`), so machine load hits both alike.

    noise_over_plain    t(plain generation) / t(perturbed generation), 10th-percentile times.
                        1.0 means the per-member noise is free; target >= 0.9.
    per_row_over_plain  the same with rows_per_member=1.

    eggroll bench generate --hidden 256 --layers 4 --members 16 --prompts-per-member 4
    eggroll bench generate --layout all --untied      # the noise layout of --train-params all

--layout picks the perturbed parameter groups as the fine-tuners' --train-params does
(`tasks.param_groups`: matrices, embeddings, head, vectors, or all; vectors get full noise);
empty: --freeze-vectors decides (matrices and the tied embedding low-rank). --untied gives the
model its own LM head (countdown-mini's model), else the head is the embedding table.
"""

from __future__ import annotations

import dataclasses
import platform
from typing import Any

import jax
import jax.numpy as jnp

from ..models import transformer as tfm
from ..sampling import generate
from ..strategy import eggroll
from ..tasks.param_groups import group_kinds, parse_groups
from .throughput import _interleaved, _paired

TARGETS = {"noise_over_plain": (">=", 0.9)}


@dataclasses.dataclass
class Config:
    vocab: int = dataclasses.field(default=1024, metadata={"help": "vocabulary size"})
    hidden: int = dataclasses.field(default=256, metadata={"help": "hidden size"})
    layers: int = dataclasses.field(default=4, metadata={"help": "decoder layers"})
    heads: int = dataclasses.field(default=4, metadata={"help": "attention heads"})
    kv_heads: int = dataclasses.field(default=2, metadata={"help": "key/value heads (GQA)"})
    intermediate: int = dataclasses.field(default=688, metadata={"help": "MLP width"})
    members: int = dataclasses.field(default=16, metadata={"help": "population members in the batch"})
    prompts_per_member: int = dataclasses.field(default=4, metadata={"help": "rows per member"})
    prompt_len: int = dataclasses.field(default=16, metadata={"help": "prompt width P (left-padded)"})
    new_tokens: int = dataclasses.field(default=32, metadata={"help": "tokens generated per row"})
    rank: int = dataclasses.field(default=1, metadata={"help": "EGGROLL noise rank"})
    sigma: float = dataclasses.field(default=0.01, metadata={"help": "noise scale"})
    freeze_vectors: bool = dataclasses.field(default=True, metadata={
        "help": "no noise on norms / biases (the LLM default); matrices (embeddings included) low-rank"})
    per_row: bool = dataclasses.field(default=True, metadata={
        "help": "also time rows_per_member=1 (noise looked up per row instead of per member)"})
    temperature: float = dataclasses.field(default=0.0, metadata={"help": "0 = greedy"})
    dtype: str = dataclasses.field(default="float32", metadata={"help": "params dtype",
                                                                "choices": ("float32", "bfloat16")})
    reps: int = dataclasses.field(default=10, metadata={"help": "timed rounds"})
    inner: int = dataclasses.field(default=2, metadata={"help": "timed calls per round and side"})
    warmup: int = dataclasses.field(default=1, metadata={"help": "untimed calls after compiling"})
    seed: int = dataclasses.field(default=0, metadata={"help": "random seed"})
    layout: str = dataclasses.field(default="", metadata={
        "help": "perturbed groups as --train-params: all, or a comma list of matrices, embeddings, head, vectors "
                "(empty: --freeze-vectors)"})
    untied: bool = dataclasses.field(default=False, metadata={"help": "a separate LM head (else tied embeddings)"})


def run(cfg: Config) -> dict:
    if cfg.members < 1 or cfg.prompts_per_member < 1 or cfg.new_tokens < 1 or cfg.prompt_len < 1:
        raise ValueError("members, prompts_per_member, prompt_len and new_tokens must be >= 1")
    if cfg.hidden % cfg.heads:
        raise ValueError(f"hidden ({cfg.hidden}) must be divisible by heads ({cfg.heads})")
    mcfg = tfm.TransformerConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_layers=cfg.layers,
                                 num_heads=cfg.heads, num_kv_heads=cfg.kv_heads, head_dim=cfg.hidden // cfg.heads,
                                 intermediate_size=cfg.intermediate, qkv_bias=True, tie_embeddings=not cfg.untied)
    key = jax.random.PRNGKey(cfg.seed)
    k_par, k_prompt, k_len, k_es, k_gen = jax.random.split(key, 5)
    dtype = jnp.dtype(cfg.dtype)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), tfm.init_params(k_par, mcfg))
    b = cfg.members * cfg.prompts_per_member
    prompts = jax.random.randint(k_prompt, (b, cfg.prompt_len), 1, cfg.vocab, jnp.int32)
    lengths = jax.random.randint(k_len, (b,), max(1, cfg.prompt_len // 2), cfg.prompt_len + 1, jnp.int32)
    prompts = jnp.where(jnp.arange(cfg.prompt_len)[None] >= cfg.prompt_len - lengths[:, None], prompts, 0)
    population = cfg.members + cfg.members % 2
    if cfg.layout:
        kinds = group_kinds(params, parse_groups(cfg.layout))
    else:
        kinds = (lambda path, x: "lowrank" if x.ndim == 2 else "frozen") if cfg.freeze_vectors else None
    es = eggroll(population, cfg.sigma, cfg.rank, kinds=kinds)
    ctx = es.setup(k_es, params)
    state = es.init(ctx)
    members = jnp.repeat(jnp.arange(cfg.members, dtype=jnp.int32), cfg.prompts_per_member)
    kw = {"max_new_tokens": cfg.new_tokens, "key": k_gen, "temperature": cfg.temperature}

    noisy = {"noise_fn": es.noise, "noise_args": (ctx, state), "member_ids": members}
    units = {
        "plain": lambda: generate(params, mcfg, prompts, lengths, **kw),
        "noise": lambda: generate(params, mcfg, prompts, lengths, rows_per_member=cfg.prompts_per_member,
                                  **noisy, **kw),
    }
    if cfg.per_row and cfg.prompts_per_member > 1:
        units["noise_per_row"] = lambda: generate(params, mcfg, prompts, lengths, **noisy, **kw)
    t = _interleaved(units, cfg.reps, cfg.warmup, inner=cfg.inner)
    lo = {k: v["quantiles_ms"][0] for k, v in t.items()}
    ms = {k: v["median_ms"] for k, v in t.items()}
    tokens = b * cfg.new_tokens
    result: dict[str, Any] = {
        "noise_over_plain": lo["plain"] / lo["noise"],
        "noise_over_plain_median": ms["plain"] / ms["noise"],
        "noise_over_plain_paired": _paired(t["plain"]["samples"], t["noise"]["samples"]),
        **({"per_row_over_plain": lo["plain"] / lo["noise_per_row"]} if "noise_per_row" in lo else {}),
        "tokens_per_s": {k: tokens / (lo[k] / 1e3) for k in lo},
    }
    target = TARGETS["noise_over_plain"][1]
    result["ok"] = {"noise_over_plain": bool(result["noise_over_plain"] >= target)}
    result["targets"] = {k: f"{o} {v}" for k, (o, v) in TARGETS.items()}
    result["timings_ms"] = {k: [round(q, 3) for q in v["quantiles_ms"]] for k, v in t.items()}  # p10, p50, p90
    result["first_call_s"] = {k: round(v["first_call_s"], 2) for k, v in t.items()}
    result["rows"] = b
    result["model_params"] = tfm.num_params(params)
    result["config"] = dataclasses.asdict(cfg)
    dev = jax.devices()[0]
    result["device"] = f"{dev.platform}:{getattr(dev, 'device_kind', '')}"
    result["jax_version"] = jax.__version__
    result["host"] = platform.machine()
    return result
