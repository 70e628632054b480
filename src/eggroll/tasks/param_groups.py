"""Parameter groups of a transformer, so that EGGROLL and GRPO can train the same parameter set.

Every leaf of `models.transformer` params belongs to groups:

    matrices     the 2-D weights of the decoder blocks (attention and MLP projections)
    embeddings   the token embedding table (model.embed_tokens.weight)
    head         the LM head (lm_head.weight); on a TIED model the head IS the embedding table,
                 so "head" selects model.embed_tokens.weight too
    vectors      1-D leaves: norm scales and biases

`parse_groups("all" | "matrices,embeddings" | ...)` -> frozenset of group names;
`check_groups(params, groups)` raises one line when a requested group matches no leaf of this
model; `group_kinds(params, groups)` -> a pytree of noise kinds for `strategy.eggroll` (selected
matrices low-rank, selected vectors full Gaussian noise, the rest frozen); `group_mask(params,
groups)` -> a pytree of bools (trained leaves) for a backprop optimizer (GRPO: `masked_optimizer`).

`llm_kinds` is the older per-flag form (embeddings / head / vectors), kept for the recipes' flags.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from .. import noise as nz

GROUPS = ("matrices", "embeddings", "head", "vectors")


def _name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def leaf_groups(path: str, leaf, tied: bool) -> frozenset:
    """The groups of one leaf (path in HF dot notation or jax keystr form)."""
    if jnp.ndim(leaf) != 2:
        return frozenset({"vectors"})
    if "embed_tokens" in path:
        return frozenset({"embeddings", "head"} if tied else {"embeddings"})
    if "lm_head" in path:
        return frozenset({"head"})
    return frozenset({"matrices"})


def is_tied(params) -> bool:
    """A transformer's params have no lm_head when the embeddings are tied."""
    return isinstance(params, dict) and "lm_head" not in params


def parse_groups(spec: str) -> frozenset:
    """'all' or a comma-separated subset of GROUPS -> frozenset (ValueError on an unknown name)."""
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    if names == ["all"]:
        return frozenset(GROUPS)
    bad = [n for n in names if n not in GROUPS]
    if bad or not names:
        raise ValueError(f"train_params: unknown parameter group(s) {bad or [spec]}; use 'all' or a comma-separated "
                         f"subset of {', '.join(GROUPS)}")
    return frozenset(names)


def check_groups(params, groups) -> None:
    """One-line ValueError when a requested group matches no leaf of `params`."""
    tied = is_tied(params)
    present = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        present |= leaf_groups(_name(path), leaf, tied)
    missing = sorted(set(groups) - present)
    if missing:
        raise ValueError(f"train_params: this model has no {', '.join(missing)} parameters (it has: "
                         f"{', '.join(g for g in GROUPS if g in present)}); drop {', '.join(missing)} from --train-params")


def _map(params, fn):
    tied = is_tied(params)
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(leaf_groups(_name(p), x, tied), x), params)


def group_kinds(params, groups):
    """Noise kinds (pytree of strings) training exactly `groups`: matrices low-rank, vectors full."""
    check_groups(params, groups)
    groups = frozenset(groups)

    def kind(g, x):
        if not g & groups:
            return nz.FROZEN
        return nz.FULL if "vectors" in g else nz.LOWRANK

    return _map(params, kind)


def group_mask(params, groups):
    """Pytree of bools: True for the leaves in `groups` (the ones a backprop optimizer trains)."""
    check_groups(params, groups)
    groups = frozenset(groups)
    return _map(params, lambda g, x: bool(g & groups))


def masked_optimizer(optimizer: optax.GradientTransformation, mask) -> optax.GradientTransformation:
    """`optimizer` on the leaves where `mask` is True; zero updates (and no state) elsewhere."""
    labels = jax.tree_util.tree_map(lambda m: "train" if m else "freeze", mask)
    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def llm_kinds(*, embeddings: bool = False, head: bool = False, vectors: str = "frozen", tied: bool = False) -> Callable:
    """Noise kinds for a transformer: weight matrices low-rank; embedding table / LM head
    low-rank only when asked (tied: the head is the embedding table, so head=True perturbs it);
    1-D leaves (norms, biases) `vectors` ("frozen" or "full")."""
    if vectors not in (nz.FROZEN, nz.FULL):
        raise ValueError(f"vectors must be 'frozen' or 'full', got {vectors!r}")

    def kind(path: str, leaf) -> str:
        if jnp.ndim(leaf) != 2:
            return vectors
        if "embed_tokens" in path:
            return nz.LOWRANK if embeddings or (head and tied) else nz.FROZEN
        if "lm_head" in path:
            return nz.LOWRANK if head else nz.FROZEN
        return nz.LOWRANK

    return kind
