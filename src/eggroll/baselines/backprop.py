"""Float32 minGRU byte language model trained by backprop: the gradient baseline for EGG.

Same shape as the integer EGG model (models/egg.py), in floating point:

    x = embed[byte]                                              [B, T, width]
    L times:  x = x + GRU(norm(x));  x = x + MLP(norm(x))
    logits = norm(x) @ head                                      [B, T, 256]

    norm(x) = w * x / (mean|x| + eps)        mean-|x| scaling, no centring (EGG's integer norm)
    MLP(a)  = (a @ W1) @ W2                  width -> 4 width -> width, no bias, no activation
    GRU, one gate f, per time step t (h: [B, width]):
        f  = sigmoid(a W_f + h U_f + b_f)
        h~ = tanh(a W_h + (f * h) U_h + b_h)
        h' = h + f * (h~ - h)

Correspondence with the integer model, where values are int8 holding 16x their real value:
the gate (f_int + 127) / 256 is a clipped-linear sigmoid (0.5 + z/16 for |z| < 8) and sat() on
h~ is a hard tanh at +-127/16 ~ 7.9; here they are the smooth sigmoid and tanh. The integer
model's other nonlinearities (int8 saturation of the residual stream and of every matmul
output, integer rounding) have no float counterpart: the MLP here is linear unless
mlp_activation is set. Weights are N(0, 1/fan_in), matching the integer model's N(0, 1)
weights followed by a ~sqrt(fan_in) shift.

The hidden state resets to zero wherever the input byte is the document separator 0, before
that byte is processed. Layers run one at a time: the input projections a W_f, a W_h of a
whole [B, T] window are one matmul each, only the recurrence h -> h' is a lax.scan over T.

Data parallel (make_train_step with a mesh): the batch axis B of the window and of the hidden
state is split over the mesh's devices inside the step (shard_map); each device back-propagates
through its own streams, then the gradients and the loss are summed over the devices in a
fixed order (population.device_sum: the same bits for any process layout); the new hidden state
comes back replicated (all-gathered), like every other output, so a checkpoint can read it on
any process. The evaluations here are replicated: every
device reads every stream (the caller places the arrays with `place`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ..population import device_sum

VOCAB = 256
EPS = 1e-6
MLP_ACTIVATIONS: dict[str, Callable] = {"none": lambda x: x, "gelu": jax.nn.gelu, "relu": jax.nn.relu}


def init_params(key, layers: int, width: int) -> dict:
    """Parameter pytree: embed [256, w], layers (list of dicts), out_norm [w], head [w, 256]."""
    def normal(k, shape, fan_in):
        return jax.random.normal(k, shape, jnp.float32) / math.sqrt(fan_in)

    k_embed, k_head, *k_layers = jax.random.split(key, 2 + layers)
    out = {"embed": jax.random.normal(k_embed, (VOCAB, width), jnp.float32),
           "out_norm": jnp.ones(width, jnp.float32),
           "head": normal(k_head, (width, VOCAB), width),
           "layers": []}
    for k in k_layers:
        ks = jax.random.split(k, 6)
        out["layers"].append({
            "norm1": jnp.ones(width, jnp.float32), "norm2": jnp.ones(width, jnp.float32),
            "w_f": normal(ks[0], (width, width), width), "u_f": normal(ks[1], (width, width), width),
            "b_f": jnp.zeros(width, jnp.float32),
            "w_h": normal(ks[2], (width, width), width), "u_h": normal(ks[3], (width, width), width),
            "b_h": jnp.zeros(width, jnp.float32),
            "mlp_in": normal(ks[4], (width, 4 * width), width),
            "mlp_out": normal(ks[5], (4 * width, width), 4 * width),
        })
    return out


def init_state(layers: int, batch: int, width: int) -> jax.Array:
    """Hidden state of every layer for `batch` streams: zeros [layers, batch, width]."""
    return jnp.zeros((layers, batch, width), jnp.float32)


def norm(x, w):
    return w * x / (jnp.mean(jnp.abs(x), axis=-1, keepdims=True) + EPS)


def gru_step(p: dict, h, xf, xh, reset):
    """One time step. h: [B, w]; xf, xh: the input projections a W_f + b_f, a W_h + b_h [B, w];
    reset: [B] bool (input byte is the separator: start from a zero state)."""
    h = jnp.where(reset[:, None], 0.0, h)
    f = jax.nn.sigmoid(xf + h @ p["u_f"])
    cand = jnp.tanh(xh + (f * h) @ p["u_h"])
    return h + f * (cand - h)


def layer(p: dict, x, h0, reset, mlp_activation: str = "none"):
    """One residual layer over a window. x: [B, T, w]; h0: [B, w]; reset: [B, T] -> (x, h_T)."""
    a = norm(x, p["norm1"])
    xf = a @ p["w_f"] + p["b_f"]
    xh = a @ p["w_h"] + p["b_h"]

    def step(h, inp):
        h = gru_step(p, h, *inp)
        return h, h

    h_last, hs = lax.scan(step, h0, (xf.swapaxes(0, 1), xh.swapaxes(0, 1), reset.T))
    x = x + hs.swapaxes(0, 1)
    m = norm(x, p["norm2"]) @ p["mlp_in"]
    return x + MLP_ACTIVATIONS[mlp_activation](m) @ p["mlp_out"], h_last


def forward(params: dict, h, inputs, mlp_activation: str = "none"):
    """inputs: uint8/int [B, T] bytes; h: [L, B, w] -> (logits [B, T, 256], new h [L, B, w])."""
    inputs = inputs.astype(jnp.int32)
    reset = inputs == 0
    x = params["embed"][inputs]
    new_h = []
    for i, p in enumerate(params["layers"]):
        x, h_i = layer(p, x, h[i], reset, mlp_activation)
        new_h.append(h_i)
    return norm(x, params["out_norm"]) @ params["head"], jnp.stack(new_h)


def bits_per_byte_sum(logits, targets, mask=None):
    """(sum of -log2 p(target), number of counted targets). logits [..., 256], targets [...]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets.astype(jnp.int32)[..., None], axis=-1)[..., 0] / math.log(2.0)
    if mask is None:
        return nll.sum(), jnp.float32(nll.size)
    return jnp.where(mask, nll, 0.0).sum(), mask.sum().astype(jnp.float32)


def loss_fn(params, h, window, mlp_activation: str = "none"):
    """Mean next-byte cross-entropy (bits) of one window [B, T+1]: inputs window[:, :-1],
    targets window[:, 1:]. Returns (loss, new h) with h detached (truncated BPTT)."""
    logits, h_new = forward(params, h, window[:, :-1], mlp_activation)
    total, count = bits_per_byte_sum(logits, window[:, 1:])
    return total / count, lax.stop_gradient(h_new)


def make_train_step(optimizer, mlp_activation: str = "none", mesh=None):
    """-> jitted (params, opt_state, h, window) -> (params, opt_state, h, train bits/byte).

    mesh (1-D, several devices): data parallel, `data_parallel_grads`; every output replicated."""
    if mesh is not None and mesh.size > 1:
        from jax.sharding import NamedSharding, PartitionSpec

        grads_of = data_parallel_grads(mesh, mlp_activation)
        jit = functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
    else:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        grads_of = lambda params, h, window: grad_fn(params, h, window, mlp_activation)  # noqa: E731
        jit = jax.jit

    def step(params, opt_state, h, window):
        (loss, h), grads = grads_of(params, h, window)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, h, loss
    return jit(step)


def data_parallel_grads(mesh, mlp_activation: str = "none"):
    """-> (params, h, window) -> ((loss, new h), grads) of loss_fn, with window [B, T+1] and
    h [L, B, w] split on B over the mesh's n devices (B a multiple of n).

    Each device differentiates its share of the mean, total_d / (count_d * n), over its own
    streams (the backward scan stays local), then `device_sum` adds the gradients and the loss:
    sum_d total_d / (count_d n) = total / count, the full batch's mean."""
    from jax.sharding import PartitionSpec as P

    (axis,) = mesh.axis_names
    n = mesh.size

    def share(params, h, window):
        logits, h_new = forward(params, h, window[:, :-1], mlp_activation)
        total, count = bits_per_byte_sum(logits, window[:, 1:])
        return total / (count * n), lax.stop_gradient(h_new)

    def local(params, h, window):
        (loss, h), grads = jax.value_and_grad(share, has_aux=True)(params, h, window)
        loss, grads = device_sum((loss, grads), axis, n)
        return (loss, h), grads

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, axis), P(axis)),
                         out_specs=((P(), P(None, axis)), P()), check_vma=False)


def eval_layout(n: int, n_streams: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cover bytes 0..n-1 once with n_streams contiguous streams, padded to whole windows.

    Returns (index [S, W*seq_len] int64, mask same shape): stream i holds bytes
    i*n//S ... (i+1)*n//S - 1 in order; the padding (mask False) repeats index 0."""
    n_streams = max(1, min(n_streams, n))
    starts = (np.arange(n_streams + 1, dtype=np.int64) * n) // n_streams
    lengths = np.diff(starts)
    width = -(-int(lengths.max()) // seq_len) * seq_len
    col = np.arange(width)
    mask = col[None, :] < lengths[:, None]
    index = np.where(mask, starts[:-1, None] + col[None, :], 0)
    return index, mask


def make_evaluate(layers: int, width: int, seq_len: int, n_streams: int, mlp_activation: str = "none"):
    """-> evaluate(params, data uint8 [n], place=None) -> bits/byte over all n bytes.

    The bytes are cut into n_streams contiguous streams (eval_layout), each started from a zero
    state with the separator 0 as its first input, so every byte is predicted exactly once.
    One jitted call per window of seq_len bytes: any data length reuses the same compilation.
    place: applied to every array before the jitted call (e.g. distributed.replicate)."""
    @jax.jit
    def window(params, h, x, y, m):  # x, y, m: [S, T]
        logits, h = forward(params, h, x, mlp_activation)
        total, count = bits_per_byte_sum(logits, y, m)
        return h, total, count

    def evaluate(params, data, place=None) -> float:
        place = place or (lambda tree: tree)
        params, data = place(params), np.asarray(data)
        index, mask = eval_layout(len(data), n_streams, seq_len)
        targets = data[index]
        inputs = np.concatenate([np.zeros((len(index), 1), np.uint8), targets[:, :-1]], axis=1)
        h = place(init_state(layers, len(index), width))
        total = count = 0.0
        for a in range(0, index.shape[1], seq_len):
            cut = slice(a, a + seq_len)
            h, t, c = window(params, h, *place((inputs[:, cut], targets[:, cut], mask[:, cut])))
            total, count = total + float(t), count + float(c)
        return total / count
    return evaluate


@functools.partial(jax.jit, static_argnames="mlp_activation")
def window_bits(params, windows, mlp_activation: str = "none"):
    """bits/byte of windows [S, T+1] read from a zero state: inputs w[:, :-1], targets w[:, 1:]
    (the `egg` recipe's held-out evaluation, for a like-for-like number)."""
    layers, width = len(params["layers"]), params["embed"].shape[1]
    logits, _ = forward(params, init_state(layers, windows.shape[0], width), windows[:, :-1], mlp_activation)
    total, count = bits_per_byte_sum(logits, windows[:, 1:])
    return total / count
