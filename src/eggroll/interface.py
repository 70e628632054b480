"""The strategy interface every evolution strategy here implements (float and integer alike).

    ctx = es.setup(key, params)                 # constant for the run (noise table, plan, key)
    state = es.init(ctx)                        # what changes each generation
    noise = es.noise(ctx, state, member)        # one member's noise handles, shaped like params
    update, state, metrics = es.tell(ctx, state, fitness)

`update` is a descent direction for optax (float strategies) or int8 ±1 steps for
`int8.apply_steps` (integer EGGROLL). Constructors share the shape (population, sigma, rank,
**options) and are registered in strategy.STRATEGIES.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class ES(NamedTuple):
    """A strategy: setup(key, params) -> NoiseContext; init(ctx) -> state;
    noise(ctx, state, member) -> noise handles; tell(ctx, state, fitness) -> (update, state, metrics)."""

    setup: Callable
    init: Callable
    noise: Callable
    tell: Callable
    population: int
    config: dict
