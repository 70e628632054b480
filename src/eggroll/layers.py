"""Perturbation-aware ops for one population member.

Each op takes a parameter, its input and the member's noise handle for that parameter
(`noise.LowRank`, `noise.Full` or None). With None they are exactly the plain op. The caller
adds population / batch axes with jax.vmap; under vmap the shared matmul x @ W.T batches into
one GEMM for the whole population and only the rank-r correction is per member:

    x (W + s A B^T)^T = x W^T + s (x B) A^T        s = sign * sigma / sqrt(r)

No per-member matrix of W's size is built for low-rank noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .noise import Full, LowRank


def noise_like(params, noise):
    """`noise`, or a tree of None shaped like params when noise is None (plain model)."""
    if noise is None:
        return jax.tree_util.tree_map(lambda _: None, params)
    return noise


def linear(w, x, noise=None):
    """x @ w.T for w of shape (out, in) (PyTorch / Hugging Face layout); x (..., in)."""
    y = x @ w.T
    if noise is None:
        return y
    if isinstance(noise, LowRank):
        a, b = noise.a.astype(x.dtype), noise.b.astype(x.dtype)
        # (..., in) @ (in, r) -> (..., r) @ (r, out): O(r (in + out)) extra per row.
        return y + (noise.scale * (x @ b)).astype(x.dtype) @ a.T
    if isinstance(noise, Full):
        return y + x @ noise.materialize().astype(x.dtype).T
    raise TypeError(f"linear: unsupported noise handle {type(noise).__name__}")


def dense(kernel, x, noise=None):
    """x @ kernel for kernel of shape (in, out) (Flax layout); x (..., in)."""
    y = x @ kernel
    if noise is None:
        return y
    if isinstance(noise, LowRank):
        a, b = noise.a.astype(x.dtype), noise.b.astype(x.dtype)
        # a has the kernel's rows (in), b its columns (out): x E = s (x A) B^T.
        return y + (noise.scale * (x @ a)).astype(x.dtype) @ b.T
    if isinstance(noise, Full):
        return y + x @ noise.materialize().astype(x.dtype)
    raise TypeError(f"dense: unsupported noise handle {type(noise).__name__}")


def embed(table, tokens, noise=None):
    """Rows `tokens` of an embedding table (vocab, d). Low-rank noise: row t of E is s A[t] B^T."""
    y = jnp.take(table, tokens, axis=0)
    if noise is None:
        return y
    if isinstance(noise, LowRank):
        rows = jnp.take(noise.a, tokens, axis=0)  # (..., r)
        return y + ((noise.scale * rows) @ noise.b.T).astype(y.dtype)
    if isinstance(noise, Full):
        return y + jnp.take(noise.materialize(), tokens, axis=0).astype(y.dtype)
    raise TypeError(f"embed: unsupported noise handle {type(noise).__name__}")


def param(value, noise=None):
    """The perturbed value of a parameter used directly (bias, norm scale, ...).

    For a low-rank handle this materialises the matrix; use `linear` / `dense` / `embed` for
    matrices in the hot path."""
    if noise is None:
        return value
    return value + noise.materialize().astype(value.dtype)
