"""Float32 backprop baseline for EGG: a minGRU byte LM of the same shape, trained with optax.

    eggroll train egg-backprop                          # stdlib corpus, ~5 min on a 2-core CPU
    eggroll train egg-backprop --dataset minipile --max-bytes 100000000
    eggroll train egg-backprop --resume                 # continue runs/egg-backprop exactly

The model is baselines/backprop.py (embed -> layers x [GRU, MLP] residual blocks -> head). Data:
`streams` parallel streams over the train split, evenly spaced and wrapping around
(tasks.text.stream_windows); generation (optimizer step) g reads bytes g*seq_len ...
(g+1)*seq_len of every stream and the hidden state is carried from one step to the next without
gradient (truncated BPTT), so a stream is read once, in order, like the EGG recipe's streams.
Loss: mean next-byte cross-entropy in bits. Optimiser: Adam with gradient clipping, linear
warm-up and cosine decay to 10% of lr at `generations`.

Every `eval_every` steps the model reads the first `eval_bytes` of the valid split
(valid_prefix_bits_per_byte); at the end (the result's summary) it reads all of it
(valid_bits_per_byte) and, for a like-for-like comparison, the egg recipe's held-out windows
(egg_eval_bits_per_byte: 64 windows of 1,024 valid bytes from a zero state, with the n-gram
figures on the same bytes). Unigram and bigram bits/byte of the same splits (fit on train) are
logged beside them.

The run harness (eggroll.harness) owns the run directory (metrics.jsonl, curve.png,
config.json, result.json, checkpoint/ with params, optimizer state, carried hidden state and
last loss), --resume and several processes. Nothing random happens after initialisation, so
`--resume` reproduces an uninterrupted run bit for bit. Data parallel (`streams` a multiple of
the global device count): the streams and their hidden states are split over every device of
every process inside the jitted step, each device back-propagates through its own streams and
the gradients are summed over the devices in a fixed order (backprop.device_sum), so the bits do
not depend on the process layout; the state stays replicated (the new hidden state is
all-gathered, so any process can checkpoint it). What a step sends is measured from the
compiled step: result["communication"], comm bytes in every record. One device: the plain step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import distributed, harness
from ..baselines import backprop as bp
from ..config import flag
from ..population import population_mesh

EGG_EVAL_STREAMS, EGG_EVAL_BYTES = 64, 65536  # recipes/egg.py defaults eval_streams, eval_bytes
# Config fields that change the training trajectory: a resumed run must match them.
TRAJECTORY_FIELDS = ("dataset", "max_bytes", "text_column", "layers", "width", "mlp_activation", "streams",
                     "seq_len", "generations", "lr", "warmup", "clip", "weight_decay", "seed")


_arg = flag  # Config field -> CLI flag (eggroll.config.flag)


@dataclass
class Config(harness.RunConfig):
    dataset: str = _arg("stdlib", "corpus: stdlib, a file/dir/glob, minipile, or a Hugging Face id")
    max_bytes: int = _arg(0, "cap on the corpus size in bytes (0: all of it)")
    text_column: str = _arg("text", "text field of JSONL files / datasets")
    cache_dir: str = _arg("", "corpus cache (empty: $EGGROLL_CACHE/text or ~/.cache/eggroll/text)")
    layers: int = _arg(1, "GRU+MLP layers (default: the CPU egg recipe's shape)")
    width: int = _arg(64, "model width (MLP hidden 4 x width)")
    mlp_activation: str = _arg("none", "MLP activation (none mirrors the integer EGG model)", bp.MLP_ACTIVATIONS)
    streams: int = _arg(128, "parallel byte streams (batch size, a multiple of the device count; "
                        "egg: population / group_size)")
    seq_len: int = _arg(64, "bytes per stream per step (truncated-BPTT length; egg: tokens_per_update)")
    generations: int = _arg(1000, "optimizer steps (default: about 5 minutes on a 2-core CPU)")
    lr: float = _arg(3e-3, "peak learning rate (Adam)")
    warmup: int = _arg(50, "linear warm-up steps")
    clip: float = _arg(1.0, "global gradient-norm clip (0: none)")
    weight_decay: float = _arg(0.0, "decoupled weight decay (AdamW; 0: Adam)")
    eval_every: int = _arg(100, "evaluate on the valid prefix every k steps")
    eval_bytes: int = _arg(65536, "bytes of the valid split read by the periodic evaluation (0: all)")
    eval_streams: int = _arg(64, "parallel streams of the evaluation")
    seed: int = _arg(0, "random seed (initialisation)")
    checkpoint_every: int = _arg(100, "checkpoint every k steps (0: only at the end)")


def validate(cfg: Config) -> Config:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"egg-backprop config: {msg}")

    for name in ("layers", "width", "streams", "seq_len", "eval_streams"):
        need(isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1,
             f"{name} must be an integer >= 1, got {getattr(cfg, name)!r}")
    for name in ("generations", "warmup", "eval_bytes", "checkpoint_every", "max_bytes"):
        need(isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 0,
             f"{name} must be an integer >= 0, got {getattr(cfg, name)!r}")
    try:
        harness.check_run_config(cfg)
    except ValueError as e:
        need(False, str(e))
    need(cfg.max_bytes == 0 or cfg.max_bytes >= 3, f"max_bytes must be 0 (all) or >= 3, got {cfg.max_bytes}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, f"lr must be a finite number > 0, got {cfg.lr}")
    need(math.isfinite(cfg.clip) and cfg.clip >= 0, f"clip must be >= 0, got {cfg.clip}")
    need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.mlp_activation in bp.MLP_ACTIVATIONS,
         f"mlp_activation must be one of {sorted(bp.MLP_ACTIVATIONS)}, got {cfg.mlp_activation!r}")
    n_dev = jax.device_count()  # every device of every process
    need(cfg.streams % n_dev == 0, f"streams {cfg.streams} must be a multiple of the {n_dev} devices"
         + (f" of all {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    return cfg


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup, 0),
                                                  max(cfg.generations, cfg.warmup + 1), end_value=0.1 * cfg.lr)
    chain = [optax.clip_by_global_norm(cfg.clip)] if cfg.clip > 0 else []
    chain.append(optax.adamw(schedule, weight_decay=cfg.weight_decay) if cfg.weight_decay > 0
                 else optax.adam(schedule))
    return optax.chain(*chain)


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    h: jax.Array  # [layers, streams, width] hidden state carried across steps (replicated)
    loss: jax.Array  # () train bits/byte of the last step (inf before the first)


def init_state(cfg: Config) -> TrainState:
    """The generation-0 state (host arrays; `make_train`'s init replicates it)."""
    params = bp.init_params(jax.random.PRNGKey(cfg.seed), cfg.layers, cfg.width)
    return TrainState(params, make_optimizer(cfg).init(params), bp.init_state(cfg.layers, cfg.streams, cfg.width),
                      jnp.float32(jnp.inf))  # inf, not NaN: replicas must compare equal


# the fields that shape the jitted functions: runs (and resumes) in one process share them
_COMPILED_BY = ("layers", "width", "mlp_activation", "seq_len", "eval_streams", "generations", "lr", "warmup",
                "clip", "weight_decay")


@functools.lru_cache(maxsize=8)
def _compiled(*key):
    cfg = Config(**dict(zip(_COMPILED_BY, key)))
    return (bp.make_train_step(make_optimizer(cfg), cfg.mlp_activation, population_mesh()),
            bp.make_evaluate(cfg.layers, cfg.width, cfg.seq_len, cfg.eval_streams, cfg.mlp_activation))


def split_streams(window: np.ndarray, mesh=None):
    """A host batch [streams, T+1] as a global array split on streams over the mesh (each
    device gets only its rows; every process passes the same batch). One device: unchanged."""
    mesh = population_mesh() if mesh is None else mesh
    if mesh.size == 1:
        return window
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0], None))
    return jax.make_array_from_callback(window.shape, sharding, lambda index: window[index])


def make_train(cfg: Config) -> harness.Train:
    """The run for the harness: one optimizer step per generation, the valid prefix as the
    periodic evaluation, the whole valid split and egg's held-out windows in the summary."""
    from ..tasks.text import load_corpus, ngram_bits_per_byte, stream_windows

    cfg = validate(cfg)
    # process 0 converts the corpus into the cache first; the others then read it
    splits = distributed.main_first(lambda: load_corpus(cfg.dataset, cfg.cache_dir or None,
                                                        max_bytes=cfg.max_bytes or None, text_column=cfg.text_column))
    ngram = ngram_bits_per_byte(splits)
    baselines = {"unigram_valid_bits_per_byte": ngram["unigram_valid"],
                 "bigram_valid_bits_per_byte": ngram["bigram_valid"]}
    train_step, evaluate = _compiled(*(getattr(cfg, k) for k in _COMPILED_BY))
    valid_prefix = splits.valid[:cfg.eval_bytes] if cfg.eval_bytes else splits.valid
    tokens_per_step = cfg.streams * cfg.seq_len
    place = distributed.replicate

    def batch(gen):
        return split_streams(stream_windows(splits.train, cfg.streams, cfg.seq_len, gen, overlap=1))

    def step(state, gen):
        params, opt_state, h, loss = train_step(state.params, state.opt_state, state.h, batch(gen))
        bits = float(loss)
        if not math.isfinite(bits):
            raise FloatingPointError(f"training diverged at step {gen + 1} (loss {bits}); lower --lr")
        return TrainState(params, opt_state, h, loss), {"train_bits_per_byte": bits,
                                                        "bytes_seen": (gen + 1) * tokens_per_step, **baselines}

    def evaluation(state, gen):
        return {"valid_prefix_bits_per_byte": evaluate(state.params, valid_prefix, place),
                "bytes_seen": gen * tokens_per_step, **baselines}

    def communication(state):  # measured from the compiled step: partial losses, gradients, hidden state
        n_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(state.params))
        return distributed.communication(train_step, state.params, state.opt_state, state.h, batch(0),
                                         n_params=n_params)

    return harness.Train(
        name="egg-backprop", init=lambda: place(init_state(cfg)), step=step, evaluate=evaluation,
        trajectory=TRAJECTORY_FIELDS, title=f"float minGRU backprop, {cfg.layers}x{cfg.width}, {cfg.dataset}",
        plot_keys=[("train_bits_per_byte", "valid_prefix_bits_per_byte", "bigram_valid_bits_per_byte",
                    "unigram_valid_bits_per_byte")],
        postfix_keys=["train_bits_per_byte", "valid_prefix_bits_per_byte"],
        summary=lambda state, result: final_result(cfg, splits, ngram, evaluate, state, result),
        communication=communication)


def final_result(cfg: Config, splits, ngram: dict, evaluate, state: TrainState, result: dict) -> dict:
    """The summary: the final model on the whole valid split and on the egg recipe's periodic
    held-out bytes (64 streams x 1,024 bytes), beside the n-grams on the same bytes."""
    from ..tasks.heldout import heldout_windows, ngram_bits_on_windows

    place = distributed.replicate
    egg_windows = heldout_windows(np.asarray(splits.valid), EGG_EVAL_BYTES, EGG_EVAL_STREAMS,
                                  max_window=EGG_EVAL_BYTES // EGG_EVAL_STREAMS)[:, 0]
    egg_ngram = ngram_bits_on_windows(splits.train, egg_windows)
    egg_bits = bp.window_bits(place(state.params), place(jnp.asarray(egg_windows)), cfg.mlp_activation)
    train_bits = float(state.loss)
    return {
        "valid_bits_per_byte": evaluate(state.params, splits.valid, place),
        "unigram_valid_bits_per_byte": ngram["unigram_valid"],
        "bigram_valid_bits_per_byte": ngram["bigram_valid"],
        "egg_eval_bits_per_byte": float(egg_bits),
        "bigram_egg_eval_bits_per_byte": egg_ngram["bigram"],
        "unigram_egg_eval_bits_per_byte": egg_ngram["unigram"],
        "unigram_train_bits_per_byte": ngram["unigram_train"],
        "bigram_train_bits_per_byte": ngram["bigram_train"],
        "train_bits_per_byte": train_bits if math.isfinite(train_bits) else None,
        "steps": result["generations"],
        "bytes_seen": result["generations"] * cfg.streams * cfg.seq_len,
        "valid_bytes": len(splits.valid),
        "train_bytes": len(splits.train),
        "dataset": cfg.dataset,
    }


def run(cfg: Config) -> dict:
    """Train with the harness (logging, checkpoints, --resume); returns the final summary dict."""
    return harness.run(validate(cfg), make_train)
