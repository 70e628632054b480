"""Fitness shaping: raw fitness (N,) -> member weights (N,). Pure functions.

Non-finite fitness (NaN, +-inf) never poisons an update: such members get weight 0 and the
statistics (mean, std, ranks) are computed over the finite members only. `strategy.tell`
counts them in its metrics.

Antithetic shapings pair members (2k, 2k+1) = (+E, -E); they return weights w with
w[2k] = -w[2k+1], so the pair contributes (w[2k] - w[2k+1]) E = 2 w[2k] E to the update.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

_TINY = 1e-12


def _finite(f):
    return jnp.isfinite(f)


def _masked_mean_std(f, mask):
    n = jnp.maximum(mask.sum(), 1)
    fz = jnp.where(mask, f, 0.0)
    mean = fz.sum() / n
    var = jnp.where(mask, (f - mean) ** 2, 0.0).sum() / n
    return mean, jnp.sqrt(var)


def raw(f):
    """Fitness as it is (non-finite -> 0)."""
    return jnp.where(_finite(f), f, 0.0).astype(jnp.float32)


def z_score(f):
    """(f - mean) / std over finite members; all-equal fitness gives all-zero weights."""
    f = f.astype(jnp.float32)
    mask = _finite(f)
    mean, std = _masked_mean_std(f, mask)
    return jnp.where(mask, (f - mean) / jnp.maximum(std, _TINY), 0.0)


def centered_rank(f):
    """Ranks mapped linearly onto [-0.5, 0.5]; ties share their average rank (so an antithetic
    pair with equal fitness contributes nothing)."""
    f = f.astype(jnp.float32)
    mask = _finite(f)
    filled = jnp.where(mask, f, -jnp.inf)  # non-finite sort to the bottom
    s = jnp.sort(filled)
    lo = jnp.searchsorted(s, filled, side="left")
    hi = jnp.searchsorted(s, filled, side="right")
    n_bad = (~mask).sum()
    n = mask.sum()
    rank = (lo + hi - 1) / 2.0 - n_bad  # 0 .. n-1 among finite members
    return jnp.where(mask, rank / jnp.maximum(n - 1, 1) - 0.5, 0.0).astype(jnp.float32)


def group_z_score(f):
    """The paper's LLM scoring. f is (N members, J groups/prompts):
    z_ij = (f_ij - mean_i f_ij) / global std, member weight = mean_j z_ij (finite entries only)."""
    if f.ndim != 2:
        raise ValueError(f"group_z_score needs fitness of shape (members, groups), got {f.shape}")
    f = f.astype(jnp.float32)
    mask = _finite(f)
    cnt = jnp.maximum(mask.sum(0), 1)
    col_mean = jnp.where(mask, f, 0.0).sum(0) / cnt
    centred = jnp.where(mask, f - col_mean, 0.0)
    std = jnp.sqrt((centred**2).sum() / jnp.maximum(mask.sum(), 1))
    z = centred / jnp.maximum(std, _TINY)
    return z.sum(1) / jnp.maximum(mask.sum(1), 1)


def _pairs(f):
    if f.shape[0] % 2:
        raise ValueError(f"antithetic shaping needs an even population, got {f.shape[0]}")
    f = f.astype(jnp.float32)
    d = f[0::2] - f[1::2]
    return d, _finite(d)


def _spread(pair_w):
    """Pair weights (N/2,) -> member weights (N,) with w[2k] = -w[2k+1] = pair_w / 2."""
    return jnp.stack([pair_w / 2, -pair_w / 2], axis=1).reshape(-1)


def antithetic_sign(f):
    """Each pair votes sign(f+ - f-) (the fast path of the integer EGG recipe)."""
    d, ok = _pairs(f)
    return _spread(jnp.where(ok, jnp.sign(d), 0.0))


def antithetic_diff(f):
    """Each pair weighs (f+ - f-) / std of the differences over finite pairs."""
    d, ok = _pairs(f)
    _, std = _masked_mean_std(d, ok)
    return _spread(jnp.where(ok, d / jnp.maximum(std, _TINY), 0.0))


SHAPINGS: dict[str, Callable] = {
    "raw": raw,
    "z_score": z_score,
    "centered_rank": centered_rank,
    "group_z_score": group_z_score,
    "antithetic_sign": antithetic_sign,
    "antithetic_diff": antithetic_diff,
}


def get_shaping(shaping) -> Callable:
    if callable(shaping):
        return shaping
    if shaping not in SHAPINGS:
        raise ValueError(f"unknown shaping {shaping!r}; choose one of {sorted(SHAPINGS)} or pass a function")
    return SHAPINGS[shaping]
