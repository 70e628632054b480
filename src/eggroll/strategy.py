"""Strategies: `eggroll(...)` (low-rank noise) and `open_es(...)` (full-rank), one interface.

    es = eggroll(population=N, rank=r, sigma=s)
    state = es.init(key, params)
    noise = es.noise(state, member)          # handles shaped like params, for one member
    grad, state, metrics = es.tell(state, fitness)
    updates, opt_state = optax_opt.update(grad, opt_state, params)

Scaling (exact). With shaped weights w_i, antithetic signs s_i and unit-variance directions
E_i = A_i B_i^T / sqrt(r) (low-rank) or eps_i (full), member i evaluates params + sigma s_i E_i
and the ES estimate of the fitness gradient is

    g = 1 / (N sigma) * sum_i w_i s_i E_i.

`tell` returns grad = -g, a *descent* direction, so any optax optimizer (which minimises)
ascends fitness. For low-rank leaves the sum is evaluated as (A * c)^T B over pairs
(c_p = (w_{2p} - w_{2p+1}) / (N sigma sqrt(r)) with antithetic pairs), chunked over the
population with float32 accumulation; same-shaped leaves are stacked into one batched GEMM, so
compile time does not grow with depth. No per-member full-size matrix is ever built.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import noise as nz
from .shaping import get_shaping

Sigma = float | Callable[[Any], Any]


class ESState:
    """key (raw uint32[2]), generation (int32), table (noise table or None); plan is static."""

    def __init__(self, key, generation, table, plan):
        self.key, self.generation, self.table, self.plan = key, generation, table, plan

    def replace(self, **kw):
        d = dict(key=self.key, generation=self.generation, table=self.table, plan=self.plan)
        d.update(kw)
        return ESState(**d)

    def __repr__(self):
        return f"ESState(generation={self.generation}, leaves={len(self.plan.leaves)})"


jax.tree_util.register_pytree_with_keys(
    ESState,
    lambda s: (tuple((jax.tree_util.GetAttrKey(n), getattr(s, n)) for n in ("key", "generation", "table")), s.plan),
    lambda plan, children: ESState(*children, plan),
    lambda s: ((s.key, s.generation, s.table), s.plan),
)


class ES(NamedTuple):
    init: Callable
    noise: Callable
    tell: Callable
    population: int
    config: dict


def _raw_key(key):
    key = jnp.asarray(key) if not hasattr(key, "dtype") else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(f"expected a jax.random key (PRNGKey or jax.random.key), got {key.dtype}{key.shape}")
    return key


def _largest_divisor_at_most(n: int, bound: int) -> int:
    for c in range(max(1, min(n, bound)), 0, -1):
        if n % c == 0:
            return c
    return 1


def _make(population, sigma, *, rank, antithetic, noise_reuse, shaping, kinds, default_kind,
          noise_source, table_size, update_chunk, name):
    if not isinstance(population, int) or population < 1:
        raise ValueError(f"population must be a positive integer, got {population!r}")
    if antithetic and population % 2:
        raise ValueError(f"antithetic sampling needs an even population, got {population}; "
                         "use an even number or antithetic=False")
    if not callable(sigma) and not float(sigma) > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    if callable(sigma) and not float(sigma(0)) > 0:
        raise ValueError(f"sigma schedule must be > 0, got sigma(0) = {float(sigma(0))}")
    shape_fn = get_shaping(shaping)
    n_dirs = population // 2 if antithetic else population

    def sigma_at(generation):
        return jnp.asarray(sigma(generation) if callable(sigma) else sigma, jnp.float32)

    def init(key, params) -> ESState:
        key = _raw_key(key)
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
                raise TypeError(
                    f"parameter {jax.tree_util.keystr(path)} has dtype {jnp.result_type(x)}: "
                    f"the float strategy {name} needs floating params (integer models: eggroll.int8)"
                )
        plan = nz.make_plan(params, rank=rank, antithetic=antithetic, noise_reuse=noise_reuse,
                            source=noise_source, kinds=kinds, default=default_kind)
        table = None
        if noise_source == "table":
            table = nz.make_table(key, nz.required_table_size(plan, table_size, n_dirs))
        return ESState(key, jnp.zeros((), jnp.int32), table, plan)

    def noise(state: ESState, member):
        """Noise handles for one member (vmap over members for the population)."""
        return nz.member_noise(state.plan, state.key, state.table, state.generation,
                               sigma_at(state.generation), member)

    def tell(state: ESState, fitness):
        """fitness (N,) (or (N, J) for group shaping) -> (grad = -g, next state, metrics)."""
        fitness = jnp.asarray(fitness)
        if fitness.ndim < 1 or fitness.shape[0] != population:
            raise ValueError(f"fitness has shape {fitness.shape}; expected ({population},) "
                             f"(or ({population}, groups) for group shaping)")
        w = shape_fn(fitness)
        if w.shape != (population,):
            raise ValueError(f"shaping returned weights of shape {w.shape}, expected ({population},)")
        sig = sigma_at(state.generation)
        dir_w = w[0::2] - w[1::2] if antithetic else w  # one weight per noise direction
        coef = dir_w.astype(jnp.float32) / (population * sig)
        grads = _es_gradient(state, coef, n_dirs, update_chunk)
        finite = jnp.isfinite(fitness)
        fin = jnp.where(finite, fitness, 0.0)
        cnt = jnp.maximum(finite.sum(), 1)
        metrics = {
            "fitness_mean": fin.sum() / cnt,
            "fitness_max": jnp.where(finite, fitness, -jnp.inf).max(),
            "fitness_min": jnp.where(finite, fitness, jnp.inf).min(),
            "nonfinite": (~finite).sum(),
            "sigma": sig,
        }
        return grads, state.replace(generation=state.generation + 1), metrics

    config = dict(strategy=name, population=population, rank=rank, antithetic=antithetic,
                  noise_reuse=noise_reuse, noise_source=noise_source, table_size=table_size,
                  shaping=shaping if isinstance(shaping, str) else getattr(shaping, "__name__", "custom"))
    return ES(init, noise, tell, population, config)


def _es_gradient(state: ESState, coef, n_dirs, update_chunk):
    """-sum_p coef_p E_p per leaf, bucketed by (kind, shape), chunked over directions."""
    plan = state.plan
    epoch = nz.epoch_of(plan, state.generation)
    buckets: dict[tuple, list[int]] = {}
    for i, leaf in enumerate(plan.leaves):
        if leaf.kind != nz.FROZEN:
            buckets.setdefault((leaf.kind, leaf.shape), []).append(i)
    out: list = [None] * len(plan.leaves)
    for (kind, shape), idx in buckets.items():
        lkeys = nz.leaf_keys(state.key, [plan.leaves[i] for i in idx])  # (L, 2)
        size = plan.size(plan.leaves[idx[0]])
        chunk = update_chunk or _largest_divisor_at_most(n_dirs, max(1, (1 << 24) // (len(idx) * size)))
        if n_dirs % chunk:
            raise ValueError(f"update_chunk {chunk} must divide the number of noise directions {n_dirs}")
        pairs = jnp.arange(n_dirs, dtype=jnp.int32).reshape(-1, chunk)
        coefs = coef.reshape(-1, chunk)
        leaf = plan.leaves[idx[0]]  # the bucket's leaves differ only in their keys
        # (L leaf keys) x (chunk pairs) -> noise of every direction: the forward's own function
        noise_all = jax.vmap(jax.vmap(nz.direction_noise, (None, None, None, None, 0, None)),
                             (None, None, 0, None, None, None))

        def body(acc, xs, kind=kind, shape=shape, lkeys=lkeys, leaf=leaf):
            p, c = xs
            z = noise_all(plan, state.table, lkeys, epoch, p, leaf)
            if kind == nz.LOWRANK:
                a, b = z  # (L, c, d0, r), (L, c, d1, r)
                # scale the factor gathered in its natural layout (XLA transposes the other one
                # into the GEMM operand; per-element work there is kept to the gather alone)
                b = b * (c / math.sqrt(plan.rank))[None, :, None, None]
                # sum over (chunk, rank) of outer products: one batched GEMM per bucket
                upd = jnp.einsum("lcir,lcjr->lij", a, b, preferred_element_type=jnp.float32)
            else:
                v = z.reshape(*z.shape[:2], -1)  # (L, chunk, size)
                upd = jnp.einsum("c,lcn->ln", c, v, preferred_element_type=jnp.float32).reshape(len(lkeys), *shape)
            return acc + upd, None

        acc0 = jnp.zeros((len(idx), *shape), jnp.float32)
        if pairs.shape[0] == 1:
            total, _ = body(acc0, (pairs[0], coefs[0]))
        else:
            total, _ = lax.scan(body, acc0, (pairs, coefs))
        for j, i in enumerate(idx):
            out[i] = (-total[j]).astype(plan.leaves[i].dtype)
    for i, leaf in enumerate(plan.leaves):
        if out[i] is None:
            out[i] = jnp.zeros(leaf.shape, leaf.dtype)
    return jax.tree_util.tree_unflatten(plan.treedef, out)


def eggroll(population: int, sigma: Sigma = 0.01, rank: int = 1, *, antithetic: bool = True,
            noise_reuse: int = 1, shaping="centered_rank", kinds=None, noise_source: str = "table",
            table_size: int | None = None, update_chunk: int | None = None) -> ES:
    """EGGROLL: matrices get rank-`rank` noise A B^T / sqrt(r), other leaves full Gaussian noise.

    kinds: function (path, leaf) -> "lowrank" | "full" | "frozen", or a pytree of those strings.
    noise_reuse: refresh noise every k generations (0 = never). sigma: float or schedule(gen)."""
    return _make(population, sigma, rank=rank, antithetic=antithetic, noise_reuse=noise_reuse,
                 shaping=shaping, kinds=kinds, default_kind=nz.default_kind, noise_source=noise_source,
                 table_size=table_size, update_chunk=update_chunk, name="eggroll")


def _all_full(path, leaf):
    return nz.FULL


def open_es(population: int, sigma: Sigma = 0.01, *, antithetic: bool = True, noise_reuse: int = 1,
            shaping="centered_rank", kinds=None, noise_source: str = "table",
            table_size: int | None = None, update_chunk: int | None = None) -> ES:
    """Full-rank OpenES (Salimans et al. 2017): every leaf gets dense Gaussian noise."""
    return _make(population, sigma, rank=1, antithetic=antithetic, noise_reuse=noise_reuse,
                 shaping=shaping, kinds=kinds, default_kind=_all_full, noise_source=noise_source,
                 table_size=table_size, update_chunk=update_chunk, name="open_es")


STRATEGIES = {"eggroll": eggroll, "open_es": open_es}
