"""MLP policy / regressor written with the perturbation-aware layers.

params = {"layers": [{"w": (out, in), "b": (out,)}, ...]}; `mlp(params, x, noise)` computes one
example (x: (..., in)); with noise=None it is the plain network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import layers


def init_mlp(key, sizes, dtype=jnp.float32):
    """LeCun-normal weights, zero biases. sizes = (in, hidden..., out)."""
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        "layers": [
            {
                "w": (jax.random.normal(k, (n_out, n_in)) / jnp.sqrt(n_in)).astype(dtype),
                "b": jnp.zeros((n_out,), dtype),
            }
            for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])
        ]
    }


def pqn(x):
    """The paper's "pqn" activation: relu(layernorm(x)) (no learned scale)."""
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return jax.nn.relu((x - mean) * jax.lax.rsqrt(var + 1e-5))


ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "pqn": pqn}


def mlp(params, x, noise=None, activation="tanh"):
    """Hidden layers use `activation`; the last layer is linear."""
    act = ACTIVATIONS[activation] if isinstance(activation, str) else activation
    noise = layers.noise_like(params, noise)
    n = len(params["layers"])
    for i, (p, e) in enumerate(zip(params["layers"], noise["layers"])):
        x = layers.linear(p["w"], x, e["w"]) + layers.param(p["b"], e["b"])
        if i < n - 1:
            x = act(x)
    return x
