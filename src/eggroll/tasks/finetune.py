"""LLM fine-tuning with verifiable rewards, the EGGROLL side (GRPO: `baselines.grpo.grpo_finetuner`).

Both fine-tuners take the same params (float32 master weights), tokenizer adapter and Task,
generate with `eggroll.sampling.generate`, score decoded text with the task's reward and log the
same diagnostics, so comparisons are like for like.

EGGROLL step (the paper's LLM recipe). J prompts; each of the N population members answers all
of them greedily (N*J rows; row (i, j) carries member id i, so every matmul adds member i's
rank-r correction). Rewards s_ij (N, J) are shaped by `shaping.group_z_score` -- z_ij = (s_ij -
mean_i s_ij) / global std, member weight = mean_j z_ij -- inside `es.tell`, and the optax
optimizer applies the ES gradient. Matrices get low-rank noise; vectors (norms, biases) are
frozen by default; embeddings and LM head are configurable (`param_groups.llm_kinds`), or any
parameter groups (`param_groups.group_kinds`, the same set GRPO trains with `group_mask`).
Each member's J rows go to the sampler as one group (`rows_per_member`); each distinct
(prompt, completion) is scored once (`score_rows`); `compute_dtype` generates with a bfloat16
copy; the jitted update is donated; `anchor_decay` pulls theta back towards theta_0.

The constants are the caller's: `ctx = ft.setup(key, params)` once per run (an `ESContext`: the
noise context and, with anchor_decay, theta_0; pass it to every `ft.step(ctx, state,
examples)`; never in the state or the checkpoint).

Several devices and processes. The members are split over every device of every process (the
population mesh): `distributed.host_fitness` gives each process its own members, which it
generates on its own devices (`generate_rows`: rows split over `local_mesh`, each device
decoding its share independently) and scores with the task's Python scorer; the (members,
prompts) score matrix -- 12 bytes per row with the diagnostics (`pack_rows`) -- is all-gathered,
and every process applies the same update to its replica of the state. Validation splits the
problems over the processes the same way (`evaluate_accuracy`). Per-row results do not depend
on how the rows are split, so every layout gives the same parameters bit for bit.

GRPO step (`eggroll.baselines.grpo`). P prompts, G samples each at temperature > 0; group
advantages; old log-probs from the sampling params; `minibatches` x `epochs` clipped updates.

`PromptStream` (the prompts of step t, replayable) and `BudgetClock` (a time budget as harness
totals and a budget stop) serve recipes that fine-tune for a fixed time on the run harness.

Tokenizer adapter: any object with encode_batch(texts, length=...) -> (ids (B, P) int32
left-padded, lengths (B,)), decode(ids) -> str, eos_ids (tuple), pad_id (int).
"""

from __future__ import annotations

import functools
import math
import random
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .. import distributed
from .. import noise as nz
from ..population import population_mesh, shard_map_unchecked
from ..sampling import decode_rows, generate, transformer_decoder
from ..strategy import eggroll
from .diagnostics import generation_diagnostics
from .param_groups import llm_kinds  # noqa: F401  (re-exported: the recipes' flags)
from .reasoning import Task

ROWS = "rows"  # the axis of a process's own devices (local_mesh)
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}  # a recipe's --compute-dtype -> compute_dtype


# --------------------------------------------------------------------------- this process's devices

def local_mesh() -> Mesh:
    """This process's devices, in population-mesh order, on one axis (ROWS)."""
    me = jax.process_index()
    return Mesh(np.asarray([d for d in population_mesh().devices.reshape(-1) if d.process_index == me]), (ROWS,))


def local_view(tree, mesh: Mesh):
    """`tree` (replicated over every process, or plain arrays) replicated on `mesh`, this
    process's devices: the shards it already holds (no copy) when jax lists them, else a copy of
    its first replica; other arrays are placed there."""
    sharding = NamedSharding(mesh, P())

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            try:
                held = {s.device: s.data for s in x.addressable_shards}
                return jax.make_array_from_single_device_arrays(x.shape, sharding,
                                                                [held[d] for d in mesh.devices.reshape(-1)])
            except ValueError:  # a fresh device_put whose shards jax cannot list: copy this process's replica
                x = x.addressable_data(0)
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(one, tree)


class Rows(NamedTuple):
    tokens: np.ndarray  # (B, max_new_tokens) int32
    finished: np.ndarray  # (B,) bool
    lengths: np.ndarray  # (B,) int32


@functools.lru_cache(maxsize=None)
def _sharded_generate(cfg, mesh, max_new_tokens, temperature, eos_ids, pad_id, noise_fn, rows_per_member, decoder):
    def body(params, ids, lens, members, noise_args, key):
        if temperature > 0:  # device d samples from its own stream
            key = jax.random.fold_in(key, lax.axis_index(ROWS))
        g = generate(params, cfg, ids, lens, max_new_tokens=max_new_tokens, key=key, temperature=temperature,
                     eos_ids=eos_ids, pad_id=pad_id, noise_fn=noise_fn, noise_args=noise_args,
                     member_ids=members if noise_fn is not None else None, rows_per_member=rows_per_member,
                     decoder=decoder)
        return tuple(g)

    specs = (P(), P(ROWS), P(ROWS), P(ROWS), P(), P())
    return jax.jit(shard_map_unchecked(body, mesh=mesh, in_specs=specs, out_specs=P(ROWS)))


def generate_rows(params, cfg, ids, lens, *, mesh: Mesh, max_new_tokens: int, eos_ids, pad_id: int,
                  temperature: float = 0.0, key=None, noise_fn=None, noise_args=None, member_ids=None,
                  rows_per_member: int = 1, compute_dtype=None) -> Rows:
    """`sampling.generate` with the rows (B a multiple of mesh.size) split over `mesh`'s devices,
    each decoding its share on its own; params and noise_args replicated on `mesh` (`local_view`).
    With temperature > 0 device d draws from fold_in(key, d) (one device: `key` itself).
    rows_per_member: groups of consecutive rows of one member (they must not straddle devices:
    a divisor of each device's share). compute_dtype (e.g. jnp.bfloat16): `params` are already
    in it; the KV cache is kept in it too."""
    key = jax.random.PRNGKey(0) if key is None else key
    kw = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), eos_ids=tuple(int(e) for e in eos_ids),
              pad_id=int(pad_id), noise_fn=noise_fn, rows_per_member=int(rows_per_member),
              decoder=None if compute_dtype is None else transformer_decoder(cfg, compute_dtype))
    if mesh.size == 1:
        g = generate(params, cfg, ids, lens, key=key, noise_args=noise_args, member_ids=member_ids, **kw)
    else:
        if len(ids) % mesh.size or (len(ids) // mesh.size) % rows_per_member:
            raise ValueError(f"{len(ids)} rows do not split over the {mesh.size} devices of this process "
                             f"(in groups of {rows_per_member})")
        rows = NamedSharding(mesh, P(ROWS))
        members = np.zeros(len(ids), np.int32) if member_ids is None else member_ids
        put = [jax.device_put(np.asarray(x, np.int32), rows) for x in (ids, lens, members)]
        g = _sharded_generate(cfg, mesh, *kw.values())(params, *put, noise_args, key)
    return Rows(np.asarray(g[0]), np.asarray(g[2]), np.asarray(g[1]))


def cast_params(params, dtype):
    """Floating leaves of params as `dtype` (None: unchanged): the compute copy of the masters."""
    if dtype is None:
        return params
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def score_rows(task: Task, texts: Sequence[str], examples: Sequence[dict], index: Sequence[int], *,
               cache: bool = True):
    """Rewards and answer ids of rows b = (texts[b], examples[index[b]]) -> (scores float32 (n,),
    answer ids (n,) int, distinct rows scored). With `cache` each distinct (example, completion)
    pair is scored once and its result shared by every row that produced it (greedy ES rows are
    mostly duplicates); the reward must be a function of (completion, example) only, as every
    task here is. cache=False scores every row."""
    first: dict = {}
    for b, key in enumerate(zip(index, texts)):
        first.setdefault(key if cache else b, b)
    uniq = list(first.values())
    s = task.score_batch([texts[b] for b in uniq], [examples[index[b]] for b in uniq])
    a = np.asarray([answer_id(task.answer(texts[b])) for b in uniq], np.int64)
    slot = {b: i for i, b in enumerate(uniq)}
    where = [slot[first[key if cache else b]] for b, key in enumerate(zip(index, texts))]
    return s[where], a[where], len(uniq)


# --------------------------------------------------------------------------- what crosses processes

def answer_id(answer) -> int:
    """An extracted answer as a 31-bit id (-1: none), for counting distinct answers anywhere."""
    return -1 if answer is None else zlib.crc32(str(answer).encode()) & 0x7FFFFFFF


def pack_rows(scores, finished, answer_ids) -> np.ndarray:
    """(n, J) rewards, finished flags and answer ids -> (n, J, 3) int32 (the float32 rewards'
    bits): what a process contributes to the all-gather, 12 bytes per row."""
    return np.stack([np.asarray(scores, np.float32).view(np.int32), np.asarray(finished, np.int32),
                     np.asarray(answer_ids, np.int32)], axis=-1)


def unpack_rows(packed):
    """pack_rows' inverse -> (scores float32, finished bool, answers: nested lists of ids / None)."""
    packed = np.asarray(packed, np.int32)
    scores = np.ascontiguousarray(packed[..., 0]).view(np.float32)
    answers = [[None if a < 0 else a for a in row] for row in packed[..., 2].tolist()]
    return scores, packed[..., 1] > 0, answers


def gather_bytes(per_process: int) -> dict:
    """Bytes of one host all-gather to which every process contributes `per_process` bytes."""
    procs = jax.process_count()
    if procs == 1:
        return {"comm_bytes_per_process": 0, "comm_bytes_sent_per_process": 0}
    return {"comm_bytes_per_process": int(per_process), "comm_bytes_sent_per_process": int(per_process) * (procs - 1)}


# --------------------------------------------------------------------------- validation

def evaluate_accuracy(params, cfg, tokenizer, task: Task, examples: Sequence[dict], *, prompt_len: int,
                      max_new_tokens: int, batch: int = 256) -> dict:
    """Greedy accuracy (mean reward) of the unperturbed params on `examples`. Each process
    answers a contiguous share (rows over its devices); rewards and stops are all-gathered."""
    n, procs = len(examples), jax.process_count()
    share = -(-n // procs)
    mine = list(examples[jax.process_index() * share:][:share])
    mine += [examples[0]] * (share - len(mine))  # the last shares are padded; trimmed below
    mesh = local_mesh()
    params = local_view(params, mesh)
    size = -(-min(batch, share) // mesh.size) * mesh.size  # one compiled shape, a multiple of the devices
    rewards, finished = [], []
    for s in range(0, share, size):
        chunk = mine[s:s + size]
        rows = chunk + chunk[:1] * (size - len(chunk))
        ids, lens = tokenizer.encode_batch([task.prompt(e) for e in rows], length=prompt_len)
        gen = generate_rows(params, cfg, ids, lens, mesh=mesh, max_new_tokens=max_new_tokens,
                            eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
        rewards.append(task.score_batch(decode_rows(tokenizer, gen.tokens)[:len(chunk)], chunk))
        finished.append(gen.finished[:len(chunk)])
    packed = pack_rows(np.concatenate(rewards)[:, None], np.concatenate(finished)[:, None], np.zeros((share, 1)))
    r, f, _ = unpack_rows(distributed.allgather_host(packed).reshape(procs * share, 1, 3)[:n])
    return {"accuracy": float((r >= 1.0).mean()), "mean_reward": float(r.mean()),
            "truncation_rate": float(1 - f.mean())}


# --------------------------------------------------------------------------- the EGGROLL fine-tuner

class FinetuneState(NamedTuple):
    params: Any
    opt_state: Any
    es_state: Any


class ESContext(NamedTuple):
    """The constants of a run (rebuilt from the seed and the starting params, never checkpointed)."""

    noise: Any  # the strategy's NoiseContext
    anchor: Any = None  # theta_0 (the starting params) when anchor_decay > 0, else None


class ESFinetuner(NamedTuple):
    es: Any
    setup: Callable  # (key, params) -> ESContext, replicated: constant, never checkpointed
    init: Callable  # (ctx, params) -> FinetuneState, replicated over every device of every process
    step: Callable  # (ctx, FinetuneState, examples) -> (FinetuneState, metrics dict)
    communication: Callable  # prompts per step -> bytes crossing processes per step


def anchored(params, anchor, decay: float):
    """theta - decay * (theta - theta_0): the weights pulled back towards their start (leaf-wise)."""
    return jax.tree_util.tree_map(lambda p, a: p - decay * (p - a), params, anchor)


def fresh_copy(tree):
    """New buffers for every leaf, so a donated state never deletes the caller's arrays."""
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def row_chunk(n: int, devices: int, max_rows: int | None) -> int:
    """Rows generated at once: a multiple of `devices` dividing n, at most max_rows (None: n)."""
    return devices * nz.largest_divisor_at_most(n // devices, max(1, (max_rows or n) // devices))


def es_finetuner(cfg, tokenizer, task: Task, optimizer: optax.GradientTransformation, *, population: int,
                 sigma: float, rank: int = 1, kinds=None, prompt_len: int, max_new_tokens: int,
                 noise_reuse: int = 1, max_rows: int | None = None, group_rows: bool = True,
                 score_cache: bool = True, compute_dtype=None, anchor_decay: float = 0.0) -> ESFinetuner:
    """EGGROLL fine-tuner with the paper's group z-score fitness (see the module docstring).
    kinds: noise kinds (function or pytree; default `llm_kinds()`; `param_groups.group_kinds`).
    max_rows: each process generates its rows in chunks of at most this many (memory).
    group_rows: hand the sampler the rows of one member as groups (`rows_per_member`: noise
    read once per group). score_cache: score each distinct (prompt, completion) once.
    compute_dtype (e.g. jnp.bfloat16): generate with a copy of the params in it (masters stay
    float32). anchor_decay lambda > 0: after each update theta <- theta - lambda (theta - theta_0).
    None of group_rows / score_cache changes a result."""
    if not 0 <= anchor_decay < 1:
        raise ValueError(f"anchor_decay must be in [0, 1), got {anchor_decay}")
    es = eggroll(population, sigma, rank, shaping="group_z_score", kinds=kinds or llm_kinds(),
                 noise_reuse=noise_reuse)
    mesh, place = local_mesh(), distributed.replicate

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))  # the old state's buffers hold the new one
    def update(params, opt_state, es_state, ctx: ESContext, fitness):
        grad, es_state, m = es.tell(ctx.noise, es_state, fitness)
        updates, opt_state = optimizer.update(grad, opt_state, params)
        m = {**m, "update_norm": optax.tree.norm(updates)}
        params = optax.apply_updates(params, updates)
        if ctx.anchor is not None:
            params = anchored(params, ctx.anchor, anchor_decay)
            m["drift_norm"] = optax.tree.norm(jax.tree_util.tree_map(jnp.subtract, params, ctx.anchor))
        return params, opt_state, es_state, m

    def member_rows(members, params, noise_args, examples):
        """This process's members' answers to every prompt -> (members, J, 3) packed rows."""
        j, k = len(examples), len(members)
        ids, lens = tokenizer.encode_batch([task.prompt(e) for e in examples], length=prompt_len)
        ids, lens, row_members = np.tile(ids, (k, 1)), np.tile(lens, k), np.repeat(members, j)  # row i*J + j
        n = k * j
        chunk = row_chunk(n, mesh.size, max_rows)
        group = math.gcd(j, chunk // mesh.size) if group_rows else 1  # a member's rows, never across devices
        gens = [generate_rows(params, cfg, ids[s:s + chunk], lens[s:s + chunk], mesh=mesh, max_new_tokens=max_new_tokens,
                              eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, noise_fn=es.noise,
                              noise_args=noise_args, member_ids=row_members[s:s + chunk], rows_per_member=group,
                              compute_dtype=compute_dtype)
                for s in range(0, n, chunk)]  # equal chunks: one compiled shape
        texts = decode_rows(tokenizer, np.concatenate([g.tokens for g in gens]))
        scores, answers, _ = score_rows(task, texts, examples, np.tile(np.arange(j), k), cache=score_cache)
        return pack_rows(scores.reshape(k, j), np.concatenate([g.finished for g in gens]).reshape(k, j),
                         answers.reshape(k, j))

    views: list = []  # [(ctx, its local view)]: the constant context is viewed once
    to_compute = jax.jit(lambda p: cast_params(p, compute_dtype))

    def step(ctx: ESContext, state: FinetuneState, examples: Sequence[dict]):
        state = place(state)
        if not views or views[0][0] is not ctx:
            views[:] = [(ctx, local_view(ctx.noise, mesh))]
        params = local_view(to_compute(state.params) if compute_dtype is not None else state.params, mesh)
        noise_args = (views[0][1], local_view(state.es_state, mesh))
        packed = distributed.host_fitness(lambda ms: member_rows(ms, params, noise_args, examples), population)
        scores, finished, answers = unpack_rows(packed)
        diag = generation_diagnostics(scores, answers=answers, finished=finished)
        params, opt_state, es_state, m = update(state.params, state.opt_state, state.es_state, ctx,
                                                place(jnp.asarray(scores)))
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        return FinetuneState(params, opt_state, es_state), {**diag, **m, "samples": population * len(examples)}

    def communication(prompts: int) -> dict:  # host_fitness: packed rows + member indices
        per = population // jax.process_count()
        return {**gather_bytes(per * (12 * prompts + 4)), "gathered": "rewards, stops, answer ids per row"}

    def setup(key, params) -> ESContext:
        # the anchor is never donated (init copies the params the state starts from): no copy needed
        return place(ESContext(es.setup(key, params), params if anchor_decay > 0 else None))

    def init(ctx: ESContext, params) -> FinetuneState:
        return place(fresh_copy(FinetuneState(params, optimizer.init(params), es.init(ctx.noise))))

    return ESFinetuner(es, setup, init, step, communication)


# --------------------------------------------------------------------------- prompts and time budgets

class PromptStream:
    """The training prompts of step t: the t-th draw of n from random.Random(seed), as if drawn
    step after step (after a resume the stream is replayed up to step t: exact, and cheap)."""

    def __init__(self, pool, seed: int, n: int):
        self.pool, self.seed, self.n = pool, seed, n
        self.rng, self.next = random.Random(seed), 0

    def at(self, step: int) -> list:
        if step != self.next:
            self.rng, self.next = random.Random(self.seed), 0
            while self.next < step:
                self._draw()
        return self._draw()

    def _draw(self) -> list:
        self.next += 1
        return [self.pool[self.rng.randrange(len(self.pool))] for _ in range(self.n)]


class BudgetClock:
    """A time budget on the run harness: the running total of the steps' own seconds on one clock
    (cpu: process CPU time; wall), agreed across processes (the slowest one's, 8 bytes per step)
    so that every process stops and evaluates at the same step. `timed(fn, *args)` -> (fn's
    result, {"cpu_s", "step_s"}: make both harness totals); `stop` is Train.stop (it takes the
    harness's total, restored from the checkpoint on a resume); `crossed(every)`: whether the
    last step crossed a multiple of `every` seconds."""

    KEYS = {"cpu": "cpu_s", "wall": "step_s"}

    def __init__(self, clock: str, budget: float):
        self.key, self.budget, self.now, self.before = self.KEYS[clock], budget, 0.0, 0.0

    def timed(self, fn, *args):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn(*args)
        spent = distributed.allgather_host(np.asarray([time.process_time() - c0, time.perf_counter() - w0],
                                                      np.float32)).max(axis=0).tolist()
        self.before = self.now
        self.now += spent[0 if self.key == "cpu_s" else 1]
        return out, {"cpu_s": spent[0], "step_s": spent[1]}

    def stop(self, record: dict) -> bool:
        self.now = record[self.key]
        return self.over()

    def over(self) -> bool:
        return self.now >= self.budget

    def crossed(self, every: float) -> bool:
        return self.now // every > self.before // every
