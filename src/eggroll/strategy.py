"""Strategies: `eggroll(...)` (low-rank noise), `open_es(...)` (full-rank), one interface.

    es = eggroll(population=N, sigma=s, rank=r)     # or open_es(N, s), int8_eggroll(N, 2**-4, r)
    ctx = es.setup(key, params)                     # constant for the run: key, noise table, plan
    state = es.init(ctx)                            # what changes each generation (the counter)
    noise = es.noise(ctx, state, member)            # handles shaped like params, for one member
    grad, state, metrics = es.tell(ctx, state, fitness)
    updates, opt_state = optax_opt.update(grad, opt_state, params)

Pass `ctx` into jitted code as an argument and never return it: it holds the noise table, which
a step returning it would copy every call. Every strategy in STRATEGIES has the constructor
shape (population, sigma, rank, **options) and these four verbs; `make_strategy(name, ...)`
builds one from a config.

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


from . import noise as nz
from .int8_strategy import int8_eggroll
from .interface import ES
from .shaping import get_shaping

Sigma = float | Callable[[Any], Any]


class ESState(NamedTuple):
    """The float strategies' changing state: the generation counter (int32)."""

    generation: jax.Array


def _raw_key(key):
    key = jnp.asarray(key) if not hasattr(key, "dtype") else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(f"expected a jax.random key (PRNGKey or jax.random.key), got {key.dtype}{key.shape}")
    return key


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

    def setup(key, params) -> nz.NoiseContext:
        """The run's constant noise context, from the seed's key and the params' structure."""
        key = _raw_key(key)
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
                raise TypeError(
                    f"parameter {jax.tree_util.keystr(path)} has dtype {jnp.result_type(x)}: "
                    f"the float strategy {name} needs floating params (integer models: int8_eggroll)"
                )
        plan = nz.make_plan(params, rank=rank, antithetic=antithetic, noise_reuse=noise_reuse,
                            source=noise_source, kinds=kinds, default=default_kind)
        table = None
        if noise_source == "table":
            table = nz.make_table(key, nz.required_table_size(plan, table_size, n_dirs))
        return nz.NoiseContext(key, table, plan)

    def init(ctx: nz.NoiseContext) -> ESState:
        return ESState(jnp.zeros((), jnp.int32))

    def noise(ctx: nz.NoiseContext, state: ESState, member):
        """Noise handles for one member (vmap over members for the population)."""
        return nz.member_noise(ctx.plan, ctx.key, ctx.table, state.generation, sigma_at(state.generation), member)

    def tell(ctx: nz.NoiseContext, state: ESState, fitness):
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
        grads = _es_gradient(ctx, state.generation, coef, update_chunk)
        return grads, ESState(state.generation + 1), {**_fitness_metrics(fitness), "sigma": sig}

    config = dict(strategy=name, population=population, rank=rank, antithetic=antithetic,
                  noise_reuse=noise_reuse, noise_source=noise_source, table_size=table_size,
                  shaping=shaping if isinstance(shaping, str) else getattr(shaping, "__name__", "custom"))
    return ES(setup, init, noise, tell, population, config)


def _fitness_metrics(fitness) -> dict:
    """Mean / max / min over the finite fitnesses, and how many were not finite."""
    finite = jnp.isfinite(fitness)
    return {"fitness_mean": jnp.where(finite, fitness, 0.0).sum() / jnp.maximum(finite.sum(), 1),
            "fitness_max": jnp.where(finite, fitness, -jnp.inf).max(),
            "fitness_min": jnp.where(finite, fitness, jnp.inf).min(),
            "nonfinite": (~finite).sum()}


def _es_gradient(ctx: nz.NoiseContext, generation, coef, update_chunk):
    """-sum_p coef_p E_p per leaf (`noise.direction_sums`: bucketed by shape, chunked)."""
    plan = ctx.plan
    sqrt_r = math.sqrt(plan.rank)

    def lowrank_sum(z, c):
        a, b = z  # (L, c, d0, r), (L, c, d1, r), stored rank-major (noise.split_factors)
        # scale the factor gathered in its natural layout (XLA transposes the other one
        # into the GEMM operand; per-element work there is kept to the gather alone)
        b = b * (c / sqrt_r)[None, :, None, None]
        # sum over (chunk, rank) of outer products: one batched GEMM per bucket, contracting the
        # (direction, rank) rows of the factors' own layout (no transposed copy for rank > 1)
        return nz.lowrank_contract(a, b, jnp.float32)

    def full_sum(v, c):  # (L, chunk, size)
        return jnp.einsum("c,lcn->ln", c, v, preferred_element_type=jnp.float32)

    sums = nz.direction_sums(plan, ctx.key, ctx.table, nz.epoch_of(plan, generation), coef,
                             lowrank_sum=lowrank_sum, full_sum=full_sum, acc_dtype=jnp.float32,
                             max_elements=1 << 24, chunk=update_chunk)
    out = [jnp.zeros(leaf.shape, leaf.dtype) if z is None else (-z).astype(leaf.dtype)
           for leaf, z in zip(plan.leaves, sums)]
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


def open_es(population: int, sigma: Sigma = 0.01, rank: int = 1, *, antithetic: bool = True, noise_reuse: int = 1,
            shaping="centered_rank", kinds=None, noise_source: str = "table",
            table_size: int | None = None, update_chunk: int | None = None) -> ES:
    """Full-rank OpenES (Salimans et al. 2017): every leaf gets dense Gaussian noise. `rank` is
    accepted so every strategy has the same constructor shape; full-rank noise has none."""
    return _make(population, sigma, rank=1, antithetic=antithetic, noise_reuse=noise_reuse,
                 shaping=shaping, kinds=kinds, default_kind=_all_full, noise_source=noise_source,
                 table_size=table_size, update_chunk=update_chunk, name="open_es")


STRATEGIES = {"eggroll": eggroll, "open_es": open_es, "int8_eggroll": int8_eggroll}
FLOAT_STRATEGIES = ("eggroll", "open_es")


def make_strategy(name: str, population: int, sigma, rank: int = 1, **options) -> ES:
    """Any registered strategy from a config: STRATEGIES[name](population, sigma, rank, **options)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](population, sigma, rank, **options)
