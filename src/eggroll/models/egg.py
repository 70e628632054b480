"""EGG: an integer-only (int8) minGRU byte-level language model (Sarkar et al. 2025, section on
integer pretraining), written from its description.

    embed (256, d) -> L x [ x = sat(x + GRU(norm x)) ; x = sat(x + MLP(norm x)) ] -> norm -> head

Every weight, activation and hidden state is int8 in fixed point (q means q / 16); matmuls
accumulate in int32 and are rescaled by a power-of-two shift (`int8.matmul_shift`, about
16 sqrt(fan_in)) and saturated to int8. There is no activation function: the nonlinearity
comes from saturation, rounding shifts and the norm.

GRU (one gate, minGRU-like), for normed input u and previous state h:

    f  = sat(W_f u + U_f h + b_f)                    (W_f u + U_f h: one int32 sum, fan-in 2d)
    g  = ((f + 127) h) >> 8                          (gate in [0, 254/256])
    h~ = sat(W_h u + U_h g + b_h)
    h' = sat(h + (((f + 127) (h~ - h)) >> 8))        (h' between h and h~)

The layer's output (added to the residual stream) is h'. MLP: d -> m d -> d (m = mlp_mult, 4 in
the paper; 0 leaves the MLP out), no bias, no activation, each matmul shifted and saturated. Logits are int8 in 1/16-bit units
(p_i ∝ 2^(l_i / 16)); `int8.log2_prob16` turns them into integer log-likelihoods.

`window_logits` / `window_logprob` compute a window of bytes of one sequence layer by layer, the
hidden state (L, d) int8 carried along; `step` is a one-byte window and `sequence_logprob` scans
it byte by byte (the reference the window form is tested against); callers vmap over members /
streams. The hidden
state is reset to zero whenever the *input* byte is 0 (the document separator), so each
document is read from a fresh state. `noise` is a pytree of integer noise handles shaped like
params (integer EGGROLL: int8_eggroll(...).noise) or None for the plain model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .. import int8 as i8

VOCAB = 256
MLP_MULT = 4


class EggShape(NamedTuple):
    layers: int
    width: int
    mlp_hidden: int  # the MLP's hidden width (0: no MLP blocks)

    @property
    def shifts(self) -> dict:
        d = self.width
        return {"gru": i8.matmul_shift(2 * d), "d": i8.matmul_shift(d),
                "mlp_hidden": i8.matmul_shift(self.mlp_hidden) if self.mlp_hidden else 0}


def _weights(key, shape):
    """int8 round(16 N(0, 1)), clipped to ±127 (init only)."""
    return jnp.clip(jnp.round(jax.random.normal(key, shape) * i8.SCALE), -i8.QMAX, i8.QMAX).astype(jnp.int8)


RESIDUAL_INITS = ("normal", "zero")
GRU_SHIFTS = ("joint", "split")


class Arch(NamedTuple):
    """Static choices of the forward pass (not parameters; hashable, so jit-static).

    gru_shift "joint" (the paper's description as we read it): W u + U h is one int32 sum of
    fan-in 2d, shifted once by matmul_shift(2d). "split": each product is shifted by its own
    matmul_shift(d) before the (saturating) add, so each keeps unit variance and the gate
    pre-activation is about sqrt(2) to 2 times larger at small widths."""

    gru_shift: str = "joint"


DEFAULT_ARCH = Arch()


def init_egg(key, layers: int, width: int, residual_init: str = "normal", mlp_mult: int = MLP_MULT) -> dict:
    """Parameters: dict of int8 arrays. Weights round(16 N(0, 1)), gains 16 (1.0), biases 0.

    residual_init "zero" starts the MLP's output matrix w2 at zero, so each MLP branch adds
    nothing to the residual stream until evolution grows it (not in the paper's description;
    see docs/RESULTS.md for its effect). mlp_mult: the MLP's hidden width is mlp_mult * width;
    0 leaves the MLP blocks out (layers of GRU alone; the other weights are unchanged)."""
    if mlp_mult < 0:
        raise ValueError(f"mlp_mult must be >= 0, got {mlp_mult}")
    if residual_init not in RESIDUAL_INITS:
        raise ValueError(f"residual_init must be one of {RESIDUAL_INITS}, got {residual_init!r}")
    if layers < 1 or width < 1:
        raise ValueError(f"EGG needs layers >= 1 and width >= 1, got layers={layers}, width={width}")
    if max(mlp_mult, 2) * width > i8.MAX_FAN_IN:
        raise ValueError(f"width {width} too large: fan-in {max(mlp_mult, 2) * width} > {i8.MAX_FAN_IN}")
    d = width
    keys = jax.random.split(key, 2 + layers)
    def gain():
        return jnp.full((d,), i8.SCALE, jnp.int8)

    def zero():
        return jnp.zeros((d,), jnp.int8)

    params = {"embed": _weights(keys[0], (VOCAB, d)), "layers": []}
    for l in range(layers):
        k = jax.random.split(keys[2 + l], 6)
        layer = {"ln1": gain(), "wf": _weights(k[0], (d, d)), "uf": _weights(k[1], (d, d)), "bf": zero(),
                 "wh": _weights(k[2], (d, d)), "uh": _weights(k[3], (d, d)), "bh": zero()}
        if mlp_mult:
            w2 = _weights(k[5], (d, mlp_mult * d)) if residual_init == "normal" else jnp.zeros((d, mlp_mult * d), jnp.int8)
            layer.update(ln2=gain(), w1=_weights(k[4], (mlp_mult * d, d)), w2=w2)
        params["layers"].append(layer)
    params["ln_out"] = gain()
    params["head"] = _weights(keys[1], (VOCAB, d))
    return params


def shape_of(params) -> EggShape:
    first = params["layers"][0]
    return EggShape(len(params["layers"]), int(params["embed"].shape[1]),
                    int(first["w1"].shape[0]) if "w1" in first else 0)


def _nz(noise, *path):
    for p in path:
        if noise is None:
            return None
        noise = noise[p]
    return noise


def _lin(w, x, noise):
    return i8.linear_acc(w, x, noise)


def _gru_pre(wx, uh, shifts, arch):
    """Gate / candidate pre-activation (int32, before the bias) from the int32 products W x, U h."""
    if arch.gru_shift == "split":
        return i8.shift_round(wx, shifts["d"]) + i8.shift_round(uh, shifts["d"])
    return i8.shift_round(wx + uh, shifts["gru"])


def _gru_cell(p, wf_u, wh_u, h, bf, bh, n_uf, n_uh, shifts, arch):
    """The recurrent half of the GRU for one byte, given the input products W_f u, W_h u."""
    h32 = h.astype(jnp.int32)
    f = i8.sat(_gru_pre(wf_u, _lin(p["uf"], h, n_uf), shifts, arch) + bf)
    gate = f.astype(jnp.int32) + i8.QMAX  # [0, 254]
    g = ((gate * h32) >> 8).astype(jnp.int8)
    cand = i8.sat(_gru_pre(wh_u, _lin(p["uh"], g, n_uh), shifts, arch) + bh)
    return i8.sat(h32 + ((gate * (cand.astype(jnp.int32) - h32)) >> 8))


def gru(p, u, h, noise, shifts, arch: Arch = DEFAULT_ARCH):
    return _gru_cell(p, _lin(p["wf"], u, _nz(noise, "wf")), _lin(p["wh"], u, _nz(noise, "wh")), h,
                     i8.vector(p["bf"], _nz(noise, "bf")), i8.vector(p["bh"], _nz(noise, "bh")),
                     _nz(noise, "uf"), _nz(noise, "uh"), shifts, arch)


def mlp(p, u, noise, shifts):
    y = i8.sat(i8.shift_round(_lin(p["w1"], u, _nz(noise, "w1")), shifts["d"]))
    return i8.sat(i8.shift_round(_lin(p["w2"], y, _nz(noise, "w2")), shifts["mlp_hidden"]))


def step(params, h, byte, noise=None, arch: Arch = DEFAULT_ARCH):
    """One byte: (params, h (L, d) int8, input byte) -> (h' (L, d) int8, logits (256,) int8).
    A window of one byte; scanning it byte by byte is the reference `window_logits` is tested
    against (all layers per byte there, all bytes per layer here)."""
    logits, h = window_logits(params, h, jnp.reshape(jnp.asarray(byte, jnp.int32), (1,)), noise, arch)
    return h, logits[0]


def init_hidden(params) -> jax.Array:
    s = shape_of(params)
    return jnp.zeros((s.layers, s.width), jnp.int8)


def sequence_logprob(params, h, tokens, noise=None, arch: Arch = DEFAULT_ARCH):
    """tokens (T + 1,) bytes: read tokens[:-1], score tokens[1:].
    -> (h after T bytes, sum of log2 p in 1/16-bit units (int32), per-byte log2 p16 (T,))."""
    tokens = jnp.asarray(tokens, jnp.int32)

    def body(h, xy):
        x, y = xy
        h, logits = step(params, h, x, noise, arch)
        return h, i8.log2_prob16(logits, y)

    h, lp = lax.scan(body, h, (tokens[:-1], tokens[1:]))
    return h, jnp.sum(lp), lp


def _gru_window(p, u, h, reset, noise, shifts, arch):
    """One GRU layer over a window: u (T, d) normed inputs, h (d,) state, reset (T,) bool.
    The input products W_f u, W_h u are one (T, d) matmul each; only U_f h, U_h g run byte by
    byte. Integer arithmetic, so this equals `gru` applied byte by byte exactly."""
    wf_u = _lin(p["wf"], u, _nz(noise, "wf"))  # (T, d) int32
    wh_u = _lin(p["wh"], u, _nz(noise, "wh"))
    bf, bh = i8.vector(p["bf"], _nz(noise, "bf")), i8.vector(p["bh"], _nz(noise, "bh"))
    n_uf, n_uh = _nz(noise, "uf"), _nz(noise, "uh")

    def body(h, xs):
        wfu, whu, r = xs
        h = _gru_cell(p, wfu, whu, jnp.where(r, jnp.zeros_like(h), h), bf, bh, n_uf, n_uh, shifts, arch)
        return h, h

    return lax.scan(body, h, (wf_u, wh_u, reset))


def window_logits(params, h, inputs, noise=None, arch: Arch = DEFAULT_ARCH):
    """Logits (T, 256) int8 for input bytes (T,) and the hidden state after them, computed layer
    by layer: every matmul except the recurrent U h runs on the whole window at once. Equal to
    scanning `step` (integer arithmetic; tested)."""
    shifts = shape_of(params).shifts
    inputs = jnp.asarray(inputs, jnp.int32)
    reset = inputs == 0  # a separator starts a fresh document
    x = i8.embed(params["embed"], inputs, _nz(noise, "embed"))  # (T, d)
    new_h = []
    for l, p in enumerate(params["layers"]):
        ln = _nz(noise, "layers", l)
        u = i8.norm(x, i8.vector(p["ln1"], _nz(ln, "ln1")))
        hl, hs = _gru_window(p, u, h[l], reset, ln, shifts, arch)
        new_h.append(hl)
        x = i8.sat(x.astype(jnp.int32) + hs)
        if "w1" in p:  # mlp_mult > 0
            u = i8.norm(x, i8.vector(p["ln2"], _nz(ln, "ln2")))
            x = i8.sat(x.astype(jnp.int32) + mlp(p, u, ln, shifts))
    x = i8.norm(x, i8.vector(params["ln_out"], _nz(noise, "ln_out")))
    logits = i8.sat(i8.shift_round(_lin(params["head"], x, _nz(noise, "head")), shifts["d"]))
    return logits, jnp.stack(new_h)


def window_logprob(params, h, tokens, noise=None, arch: Arch = DEFAULT_ARCH):
    """`sequence_logprob` computed layer by layer (`window_logits`): same results, faster."""
    tokens = jnp.asarray(tokens, jnp.int32)
    logits, h = window_logits(params, h, tokens[:-1], noise, arch)
    lp = jax.vmap(i8.log2_prob16)(logits, tokens[1:])
    return h, jnp.sum(lp), lp


def heldout_bits(params, windows, arch: Arch = DEFAULT_ARCH):
    """Total exact cross-entropy in bits (float32: a metric, not training) of the plain model
    reading windows (streams, n_windows, T + 1) (`tasks.heldout.heldout_windows`): each stream
    from a zero state, its hidden state carried across its windows."""
    windows = jnp.asarray(windows, jnp.int32)
    h0 = jnp.zeros((windows.shape[0], *init_hidden(params).shape), jnp.int8)
    read = jax.vmap(window_logits, (None, 0, 0, None, None))

    def body(h, win):  # win (streams, T + 1)
        logits, h = read(params, h, win[:, :-1], None, arch)
        return h, -jnp.sum(i8.log2_prob_float(logits, win[:, 1:]))

    _, bits = lax.scan(body, h0, jnp.swapaxes(windows, 0, 1))
    return jnp.sum(bits)
