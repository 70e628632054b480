"""LLM fine-tuning with verifiable rewards, the EGGROLL side (GRPO: `baselines.grpo.grpo_finetuner`).

Both fine-tuners take the same params (float32 master weights), tokenizer adapter and Task,
generate with `eggroll.sampling.generate`, score decoded text with the task's reward and log the
same diagnostics, so comparisons are like for like.

EGGROLL step (the paper's LLM recipe). J prompts; each of the N population members answers all
of them greedily (N*J rows in one batched generation; row (i, j) carries member id i, so every
matmul adds member i's rank-r correction). Rewards s_ij (N, J) are shaped by
`shaping.group_z_score` -- z_ij = (s_ij - mean_i s_ij) / global std, member weight = mean_j z_ij
-- inside `es.tell`, and the optax optimizer applies the ES gradient. Matrices get low-rank
noise; vectors (norms, biases) are frozen by default; embeddings and LM head are configurable
(`llm_kinds`).

GRPO step (`eggroll.baselines.grpo`). P prompts, G samples each at temperature > 0; group
advantages; old log-probs from the sampling params; `minibatches` x `epochs` clipped updates.

Tokenizer adapter: any object with encode_batch(texts, length=...) -> (ids (B, P) int32
left-padded, lengths (B,)), decode(ids) -> str, eos_ids (tuple), pad_id (int).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import noise as nz
from ..sampling import decode_rows, generate
from ..strategy import eggroll
from .diagnostics import generation_diagnostics
from .reasoning import Task


def llm_kinds(*, embeddings: bool = False, head: bool = False, vectors: str = "frozen") -> Callable:
    """Noise kinds for a transformer: weight matrices low-rank; embedding table / LM head
    low-rank only when asked; 1-D leaves (norms, biases) `vectors` ("frozen" or "full")."""
    if vectors not in (nz.FROZEN, nz.FULL):
        raise ValueError(f"vectors must be 'frozen' or 'full', got {vectors!r}")

    def kind(path: str, leaf) -> str:
        if jnp.ndim(leaf) != 2:
            return vectors
        if "embed_tokens" in path:
            return nz.LOWRANK if embeddings else nz.FROZEN
        if "lm_head" in path:
            return nz.LOWRANK if head else nz.FROZEN
        return nz.LOWRANK

    return kind


def evaluate_accuracy(params, cfg, tokenizer, task: Task, examples: Sequence[dict], *, prompt_len: int,
                      max_new_tokens: int, batch: int = 256) -> dict:
    """Greedy accuracy (mean reward) of the unperturbed params on `examples`."""
    rewards, finished = [], []
    for s in range(0, len(examples), batch):
        chunk = list(examples[s:s + batch])
        pad = batch - len(chunk) if len(examples) > batch else 0  # keep one compiled shape
        ids, lens = tokenizer.encode_batch([task.prompt(e) for e in chunk + chunk[:1] * pad], length=prompt_len)
        gen = generate(params, cfg, ids, lens, max_new_tokens=max_new_tokens, eos_ids=tokenizer.eos_ids,
                       pad_id=tokenizer.pad_id)
        texts = decode_rows(tokenizer, gen.tokens)[:len(chunk)]
        rewards.append(task.score_batch(texts, chunk))
        finished.append(np.asarray(gen.finished)[:len(chunk)])
    r, f = np.concatenate(rewards), np.concatenate(finished)
    return {"accuracy": float((r >= 1.0).mean()), "mean_reward": float(r.mean()),
            "truncation_rate": float(1 - f.mean())}


class _Gen(NamedTuple):
    tokens: np.ndarray
    finished: np.ndarray


class FinetuneState(NamedTuple):
    params: Any
    opt_state: Any
    es_state: Any


class ESFinetuner(NamedTuple):
    es: Any
    init: Callable  # (key, params) -> FinetuneState; builds the run's noise context once
    step: Callable  # (FinetuneState, examples) -> (FinetuneState, metrics dict)


def es_finetuner(cfg, tokenizer, task: Task, optimizer: optax.GradientTransformation, *, population: int,
                 sigma: float, rank: int = 1, kinds: Callable | None = None, prompt_len: int,
                 max_new_tokens: int, noise_reuse: int = 1, max_rows: int | None = None) -> ESFinetuner:
    """EGGROLL fine-tuner with the paper's group z-score fitness (see the module docstring).
    max_rows: generate the population x prompts rows in chunks of at most this many (memory)."""
    es = eggroll(population, sigma, rank, shaping="group_z_score", kinds=kinds or llm_kinds(),
                 noise_reuse=noise_reuse)

    context: dict = {}  # the noise context (constant for the run): made by init, never in the state

    @jax.jit
    def update(params, opt_state, es_state, ctx, fitness):
        grad, es_state, m = es.tell(ctx, es_state, fitness)
        updates, opt_state = optimizer.update(grad, opt_state, params)
        m = {**m, "update_norm": optax.tree.norm(updates)}
        return optax.apply_updates(params, updates), opt_state, es_state, m

    def init(key, params) -> FinetuneState:
        context["ctx"] = es.setup(key, params)
        return FinetuneState(params, optimizer.init(params), es.init(context["ctx"]))

    def step(state: FinetuneState, examples: Sequence[dict]):
        if "ctx" not in context:
            raise RuntimeError("call init(key, params) before step: it builds the noise context")
        ctx = context["ctx"]
        j = len(examples)
        ids, lens = tokenizer.encode_batch([task.prompt(e) for e in examples], length=prompt_len)
        members = np.repeat(np.arange(population, dtype=np.int32), j)  # row i*J + j: member i, prompt j
        rows_ids, rows_lens = np.tile(ids, (population, 1)), np.tile(lens, population)
        n = population * j
        chunk = nz.largest_divisor_at_most(n, max_rows or n)
        tokens, finished = [], []
        for s in range(0, n, chunk):  # equal chunks: one compiled shape
            g = generate(state.params, cfg, rows_ids[s:s + chunk], rows_lens[s:s + chunk],
                         max_new_tokens=max_new_tokens, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                         noise_fn=es.noise, noise_args=(ctx, state.es_state), member_ids=members[s:s + chunk])
            tokens.append(np.asarray(g.tokens))
            finished.append(np.asarray(g.finished))
        gen = _Gen(np.concatenate(tokens), np.concatenate(finished))
        texts = decode_rows(tokenizer, gen.tokens)
        scores = task.score_batch(texts, list(examples) * population).reshape(population, j)
        answers = [[task.answer(texts[i * j + q]) for q in range(j)] for i in range(population)]
        diag = generation_diagnostics(scores, answers=answers,
                                      finished=np.asarray(gen.finished).reshape(population, j))
        params, opt_state, es_state, m = update(state.params, state.opt_state, state.es_state, ctx,
                                                jnp.asarray(scores))
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        return FinetuneState(params, opt_state, es_state), {**diag, **m, "samples": population * j}

    return ESFinetuner(es, init, step)
