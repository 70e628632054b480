"""Generate text from a trained EGG checkpoint: `eggroll sample --checkpoint runs/egg --prompt TEXT`.

The integer model reads the prompt (after a document separator, so from a fresh hidden state)
and then samples `length` bytes from p_i ∝ 2^(l_i / (16 * temperature)) over its int8 logits
(temperature 0: greedy). Bytes are printed as UTF-8 with invalid sequences replaced; sampling
stops early at a separator byte 0. The last line is a JSON object (the CLI convention).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from ..checkpoint import load_checkpoint, read_metadata
from ..int8_strategy import IntESState
from .egg import TrainState
from ..config import flag
from ..models import egg


@dataclass
class Config:
    checkpoint: str = flag("runs/egg", "run directory or its checkpoint/ directory")
    prompt: str = flag("def ", "text to continue")
    length: int = flag(200, "bytes to generate")
    temperature: float = flag(0.8, "sampling temperature (0: greedy)")
    seed: int = flag(0, "sampling seed")
    quiet: bool = flag(False, "do not print the text before the JSON line")


def load_model(path) -> tuple[dict, dict]:
    """(params, metadata) of an EGG checkpoint (run directory or checkpoint directory)."""
    path = Path(path)
    ckpt = path / "checkpoint" if (path / "checkpoint" / "meta.json").exists() else path
    if not (ckpt / "meta.json").exists():
        raise FileNotFoundError(f"no EGG checkpoint at {path} (expected meta.json and arrays.safetensors; "
                                "train one with `eggroll train egg`)")
    meta = read_metadata(ckpt)
    cfg = meta.get("config", {})
    if "width" not in cfg or "layers" not in cfg:
        raise ValueError(f"{ckpt} is not an EGG checkpoint (its config has no layers/width)")
    params = egg.init_egg(jax.random.PRNGKey(0), cfg["layers"], cfg["width"], mlp_mult=cfg.get("mlp_mult", egg.MLP_MULT))
    hidden = jnp.zeros((cfg["population"], cfg["layers"], cfg["width"]), jnp.int8)
    momentum = None  # the integer momentum is saved beside the params
    if cfg.get("momentum_bits"):
        momentum = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.int32), params)
    template = TrainState(params, hidden, IntESState(jnp.zeros((), jnp.int32), momentum))
    tree, meta = load_checkpoint(ckpt, template)
    return tree.params, meta


def arch_of(meta: dict) -> egg.Arch:
    """The forward-pass options a checkpoint was trained with."""
    return egg.Arch(meta.get("config", {}).get("gru_shift", "joint"))


def generate(params, prompt: bytes, length: int, temperature: float, key, arch: egg.Arch = egg.DEFAULT_ARCH) -> bytes:
    """Continue `prompt` by `length` bytes (stops early at a 0 byte)."""
    logits, h = egg.window_logits(params, egg.init_hidden(params), jnp.asarray([0, *prompt], jnp.int32), None, arch)
    last = logits[-1]

    @jax.jit
    def next_byte(h, logits, k):
        if temperature > 0:  # p ∝ 2^(l / 16T) = exp(l ln2 / 16T)
            b = jax.random.categorical(k, logits.astype(jnp.float32) * (math.log(2) / (16 * temperature)))
        else:
            b = jnp.argmax(logits)
        h, logits = egg.step(params, h, b, None, arch)
        return h, logits, b

    out = []
    for k in jax.random.split(key, length):
        h, last, b = next_byte(h, last, k)
        b = int(b)
        if b == 0:
            break
        out.append(b)
    return bytes(out)


def run(cfg: Config) -> dict:
    if cfg.length < 0 or not (cfg.temperature >= 0 and math.isfinite(cfg.temperature)):
        raise ValueError(f"length must be >= 0 and temperature a finite number >= 0, got {cfg.length}, {cfg.temperature}")
    params, meta = load_model(cfg.checkpoint)
    prompt = cfg.prompt.encode("utf-8")
    text = generate(params, prompt, cfg.length, cfg.temperature, jax.random.PRNGKey(cfg.seed), arch_of(meta))
    full = (prompt + text).decode("utf-8", errors="replace")
    if not cfg.quiet:
        print(full, file=sys.stdout)
    return {"prompt": cfg.prompt, "generated": text.decode("utf-8", errors="replace"),
            "generated_bytes": len(text), "generation": meta.get("generation"),
            "valid_bits_per_byte": meta.get("valid_bits_per_byte")}
