"""What fine-tuning costs and keeps: forgetting (held-out loss of the base distribution, drift
from the start) and coverage (Pass@1 / Pass@K on held-out problems), the same for every method.

    pass_at_k(n, c, k)                          # unbiased estimator (Chen et al. 2021)
    coverage(params, cfg, tok, task, problems, prompt_len=..., max_new_tokens=..., samples=16)
        -> {"pass@1": ..., "pass@2": ..., ..., "pass@16": ..., "samples": 16, "temperature": 1.0}
    mean_token_nll(params, cfg, ids, lengths)   # nats per token of left-padded text rows
    drift(params, params0) -> {"drift_norm": ||theta - theta_0||, "drift_rel": ... / ||theta_0||}

Pass@K. For each problem n >= K completions are sampled at `temperature` and c of them are
correct (reward >= 1); pass@K = 1 - C(n - c, K) / C(n, K), the probability that a random
K-subset of the n holds a correct one (unbiased for the true pass@K of the policy, unlike
1 - (1 - c/n)^K), averaged over problems. Every process samples every problem (the same key:
the same completions on the same device layout); rows are generated `batch` at a time.

Forgetting. `mean_token_nll` scores text the base model knew (a held-out plain-text file for a
real checkpoint; for countdown-mini the solver's solutions of held-out problems, its supervised
distribution) -- compare before (the start) and after fine-tuning; `drift` is the distance
travelled in weight space. An ES fine-tune may drift more than GRPO (arXiv 2601.20861); the
ES finetuner's `anchor_decay` pulls the weights back towards theta_0 each generation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..sampling import decode_rows, prompt_positions
from .finetune import generate_rows, local_mesh, local_view, row_chunk
from .task import Task


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): P(some of k of the n samples, drawn without replacement, is correct)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_table(correct: Sequence[int], n: int, ks: Sequence[int]) -> dict:
    """Mean pass@k over problems with correct[i] of n samples right, for each k in ks."""
    return {f"pass@{k}": float(np.mean([pass_at_k(n, int(c), k) for c in correct])) for k in ks}


def default_ks(samples: int) -> list[int]:
    """1, 2, 4, ... up to `samples`, and `samples` itself."""
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= samples]
    return ks + [samples] if ks[-1] != samples else ks


def coverage(params, cfg, tokenizer, task: Task, problems: Sequence[dict], *, prompt_len: int, max_new_tokens: int,
             samples: int = 16, temperature: float = 1.0, key=None, batch: int = 1024, ks=None) -> dict:
    """Pass@k on `problems`, `samples` completions each at `temperature` (see the module docstring)."""
    if samples < 1 or not temperature > 0:
        raise ValueError(f"coverage needs samples >= 1 and temperature > 0, got {samples}, {temperature}")
    key = jax.random.PRNGKey(0) if key is None else key
    mesh = local_mesh()
    ids, lens = tokenizer.encode_batch([task.prompt(e) for e in problems], length=prompt_len)
    ids, lens = np.repeat(ids, samples, axis=0), np.repeat(lens, samples)  # row p * samples + s
    rows = [e for e in problems for _ in range(samples)]
    pad = -len(ids) % mesh.size
    ids, lens = np.concatenate([ids, ids[:pad]]), np.concatenate([lens, lens[:pad]])
    n = len(ids)
    chunk = row_chunk(n, mesh.size, batch)
    view = local_view(params, mesh)
    toks = np.concatenate([generate_rows(view, cfg, ids[s:s + chunk], lens[s:s + chunk], mesh=mesh,
                                         max_new_tokens=max_new_tokens, eos_ids=tokenizer.eos_ids,
                                         pad_id=tokenizer.pad_id, temperature=temperature,
                                         key=jax.random.fold_in(key, s // chunk)).tokens
                           for s in range(0, n, chunk)])[:len(rows)]
    scores = task.score_batch(decode_rows(tokenizer, toks), rows).reshape(len(problems), samples)
    correct = (scores >= 1.0).sum(axis=1)
    return {**pass_at_k_table(correct, samples, ks or default_ks(samples)), "samples": samples,
            "temperature": float(temperature), "problems": len(problems)}


@functools.lru_cache(maxsize=None)  # one compiled scorer per model config
def _row_nll(cfg):
    from ..baselines.grpo import transformer_logprob_fn

    fn = transformer_logprob_fn(cfg)

    @jax.jit
    def nll(params, ids, lengths, context):
        width = ids.shape[1]
        pos = prompt_positions(lengths, width)
        lp = jax.vmap(fn, in_axes=(None, 0, 0))(params, ids, pos)  # (B, width - 1): token t+1 given <= t
        first = width - lengths + jnp.maximum(context, 1)  # the first scored token's column
        mask = (jnp.arange(1, width)[None, :] >= first[:, None]).astype(jnp.float32)
        return -(lp * mask).sum(), mask.sum()

    return nll


def mean_token_nll(params, cfg, ids, lengths, *, context=None, batch: int = 256) -> float:
    """Nats per predicted token of left-padded rows ids (B, W) with `lengths` real tokens each:
    every real token after a row's first `context[b]` (default 1) is predicted from the ones
    before it."""
    ids, lengths = np.asarray(ids, np.int32), np.asarray(lengths, np.int32)
    context = np.ones(len(ids), np.int32) if context is None else np.asarray(context, np.int32)
    fn, total, count = _row_nll(cfg), 0.0, 0.0
    for s in range(0, len(ids), batch):
        t, c = fn(params, ids[s:s + batch], lengths[s:s + batch], context[s:s + batch])
        total, count = total + float(t), count + float(c)
    if count == 0:
        raise ValueError("mean_token_nll: no row has two or more tokens")
    return total / count


def drift(params, params0) -> dict:
    """||theta - theta_0|| (all leaves) and its ratio to ||theta_0||."""
    d = optax.tree.norm(jax.tree_util.tree_map(jnp.subtract, params, params0))
    return {"drift_norm": float(d), "drift_rel": float(d / jnp.maximum(optax.tree.norm(params0), 1e-30))}
