"""Float32 backprop baseline for EGG: a minGRU byte LM of the same shape, trained with optax.

    eggroll train egg-backprop                          # stdlib corpus, ~5 min on a 2-core CPU
    eggroll train egg-backprop --dataset minipile --max-bytes 100000000
    eggroll train egg-backprop --resume                 # continue runs/egg-backprop exactly

The model is baselines/backprop.py (embed -> layers x [GRU, MLP] residual blocks -> head). Data:
`streams` parallel streams over the train split, evenly spaced and wrapping around
(tasks.text.stream_windows); step s reads bytes s*seq_len ... (s+1)*seq_len of every stream and
the hidden state is carried from one step to the next without gradient (truncated BPTT), so a
stream is read once, in order, like the EGG recipe's streams. Loss: mean next-byte
cross-entropy in bits. Optimiser: Adam with gradient clipping, linear warm-up and cosine decay
to 10% of lr at `steps`.

Every `eval_every` steps the model reads the first `eval_bytes` of the valid split
(valid_prefix_bits_per_byte); at the end it reads all of it (valid_bits_per_byte) and, for a
like-for-like comparison, the egg recipe's held-out windows (egg_eval_bits_per_byte: 32 windows
of 256 valid bytes from a zero state, with the n-gram figures on the same bytes). Unigram and
bigram bits/byte of the same splits (fit on train) are logged beside them. The run directory
holds metrics.jsonl, curve.png, config.json, result.json and checkpoint/ (params, optimizer
state, carried hidden state; the step, wall clock and config in its metadata). Nothing random
happens after initialisation, so `--resume` reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from ..baselines import backprop as bp
from ..checkpoint import load_checkpoint, save_checkpoint, config_mismatch
from ..runlog import RunLog
from ..tasks.heldout import heldout_windows, ngram_bits_on_windows
from ..tasks.text import load_corpus, ngram_bits_per_byte, stream_windows
from ..config import flag

EGG_EVAL_STREAMS, EGG_EVAL_BYTES = 64, 65536  # recipes/egg.py defaults eval_streams, eval_bytes
# Config fields that change the training trajectory: a resumed run must match them.
TRAJECTORY_FIELDS = ("dataset", "max_bytes", "text_column", "layers", "width", "mlp_activation", "streams",
                     "seq_len", "steps", "lr", "warmup", "clip", "weight_decay", "seed")


_arg = flag  # Config field -> CLI flag (eggroll.config.flag)


@dataclass
class Config:
    dataset: str = _arg("stdlib", "corpus: stdlib, a file/dir/glob, minipile, or a Hugging Face id")
    max_bytes: int = _arg(0, "cap on the corpus size in bytes (0: all of it)")
    text_column: str = _arg("text", "text field of JSONL files / datasets")
    cache_dir: str = _arg("", "corpus cache (empty: $EGGROLL_CACHE/text or ~/.cache/eggroll/text)")
    layers: int = _arg(1, "GRU+MLP layers (default: the CPU egg recipe's shape)")
    width: int = _arg(64, "model width (MLP hidden 4 x width)")
    mlp_activation: str = _arg("none", "MLP activation (none mirrors the integer EGG model)", bp.MLP_ACTIVATIONS)
    streams: int = _arg(128, "parallel byte streams (batch size; egg: population / group_size)")
    seq_len: int = _arg(64, "bytes per stream per step (truncated-BPTT length; egg: tokens_per_update)")
    steps: int = _arg(1000, "optimizer steps (default: about 5 minutes on a 2-core CPU)")
    lr: float = _arg(3e-3, "peak learning rate (Adam)")
    warmup: int = _arg(50, "linear warm-up steps")
    clip: float = _arg(1.0, "global gradient-norm clip (0: none)")
    weight_decay: float = _arg(0.0, "decoupled weight decay (AdamW; 0: Adam)")
    eval_every: int = _arg(100, "evaluate on the valid prefix every k steps (0: only at the end)")
    eval_bytes: int = _arg(65536, "bytes of the valid split read by the periodic evaluation (0: all)")
    eval_streams: int = _arg(64, "parallel streams of the evaluation")
    seed: int = _arg(0, "random seed (initialisation)")
    run_dir: str = _arg("", "run directory; empty: runs/egg-backprop")
    checkpoint_every: int = _arg(100, "checkpoint every k steps (0: only at the end)")
    resume: bool = _arg(False, "continue from the run directory's checkpoint, if there is one")
    progress: bool = _arg(True, "progress bar on stderr (shown only in a terminal)")


def validate(cfg: Config) -> Config:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"egg-backprop config: {msg}")

    for name in ("layers", "width", "streams", "seq_len", "eval_streams"):
        need(isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1,
             f"{name} must be an integer >= 1, got {getattr(cfg, name)!r}")
    for name in ("steps", "warmup", "eval_every", "eval_bytes", "checkpoint_every", "max_bytes"):
        need(isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 0,
             f"{name} must be an integer >= 0, got {getattr(cfg, name)!r}")
    need(cfg.max_bytes == 0 or cfg.max_bytes >= 3, f"max_bytes must be 0 (all) or >= 3, got {cfg.max_bytes}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, f"lr must be a finite number > 0, got {cfg.lr}")
    need(math.isfinite(cfg.clip) and cfg.clip >= 0, f"clip must be >= 0, got {cfg.clip}")
    need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.mlp_activation in bp.MLP_ACTIVATIONS,
         f"mlp_activation must be one of {sorted(bp.MLP_ACTIVATIONS)}, got {cfg.mlp_activation!r}")
    return cfg


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup, 0),
                                                  max(cfg.steps, cfg.warmup + 1), end_value=0.1 * cfg.lr)
    chain = [optax.clip_by_global_norm(cfg.clip)] if cfg.clip > 0 else []
    chain.append(optax.adamw(schedule, weight_decay=cfg.weight_decay) if cfg.weight_decay > 0
                 else optax.adam(schedule))
    return optax.chain(*chain)


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    h: jax.Array  # [layers, streams, width] hidden state carried across steps


# the fields that shape the jitted functions: runs (and resumes) in one process share them
_COMPILED_BY = ("layers", "width", "mlp_activation", "seq_len", "eval_streams", "steps", "lr", "warmup",
                "clip", "weight_decay")


@functools.lru_cache(maxsize=8)
def _compiled(*key):
    cfg = Config(**dict(zip(_COMPILED_BY, key)))
    return (bp.make_train_step(make_optimizer(cfg), cfg.mlp_activation),
            bp.make_evaluate(cfg.layers, cfg.width, cfg.seq_len, cfg.eval_streams, cfg.mlp_activation))


def _resume_mismatch(cfg: Config, saved: dict) -> list[str]:
    return config_mismatch(cfg, saved, TRAJECTORY_FIELDS)


def _load_state(cfg: Config, ckpt_dir: Path, state: TrainState) -> tuple[TrainState, dict]:
    if not (ckpt_dir / "arrays.safetensors").exists():
        print(f"[egg-backprop] --resume: no checkpoint in {ckpt_dir}, starting from scratch", file=sys.stderr)
        return state, {}
    saved = json.loads((ckpt_dir / "meta.json").read_text()).get("metadata", {})
    bad = _resume_mismatch(cfg, saved.get("config", {}))
    if bad:
        raise ValueError(f"cannot resume {ckpt_dir}: the config differs in fields that change "
                         f"training ({'; '.join(bad)}); use the original values or a new run_dir")
    return load_checkpoint(ckpt_dir, state)


def run(cfg: Config) -> dict:
    """Train with logging, checkpoints and evaluation; returns the final summary dict."""
    validate(cfg)
    t0 = time.perf_counter()
    run_dir = Path(cfg.run_dir or "runs/egg-backprop")
    ckpt_dir = run_dir / "checkpoint"
    splits = load_corpus(cfg.dataset, cfg.cache_dir or None, max_bytes=cfg.max_bytes or None,
                         text_column=cfg.text_column)
    ngram = ngram_bits_per_byte(splits)
    baselines = {"unigram_valid_bits_per_byte": ngram["unigram_valid"],
                 "bigram_valid_bits_per_byte": ngram["bigram_valid"]}

    optimizer = make_optimizer(cfg)
    params = bp.init_params(jax.random.PRNGKey(cfg.seed), cfg.layers, cfg.width)
    state = TrainState(params, optimizer.init(params), bp.init_state(cfg.layers, cfg.streams, cfg.width))
    meta: dict = {}
    if cfg.resume:
        state, meta = _load_state(cfg, ckpt_dir, state)
    elif (ckpt_dir / "arrays.safetensors").exists():
        print(f"[egg-backprop] starting a fresh run in {run_dir}; its checkpoint will be overwritten "
              "(--resume continues it instead)", file=sys.stderr)
    start = int(meta.get("step", 0))

    train_step, evaluate = _compiled(*(getattr(cfg, k) for k in _COMPILED_BY))
    valid_prefix = splits.valid[:cfg.eval_bytes] if cfg.eval_bytes else splits.valid
    tokens_per_step = cfg.streams * cfg.seq_len

    log = RunLog(run_dir, total=cfg.steps, x="step", resume_from=start if meta else None,
                 wall_offset=meta.get("wall_s"),
                 plot_keys=[("train_bits_per_byte", "valid_prefix_bits_per_byte", "valid_bits_per_byte",
                             "bigram_valid_bits_per_byte", "unigram_valid_bits_per_byte")],
                 postfix_keys=["train_bits_per_byte", "valid_prefix_bits_per_byte"],
                 progress=None if cfg.progress else False, desc="egg-backprop",
                 title=f"float minGRU backprop, {cfg.layers}x{cfg.width}, {cfg.dataset}", start_time=t0)
    log.write_json("config", dataclasses.asdict(cfg))
    if not meta:
        log.log(0, {"valid_prefix_bits_per_byte": evaluate(state.params, valid_prefix), "bytes_seen": 0, **baselines})

    step = start
    train_bits = meta.get("train_bits_per_byte")

    def checkpoint():
        save_checkpoint(ckpt_dir, state, {"step": step, "wall_s": log.elapsed, "train_bits_per_byte": train_bits,
                                          "config": dataclasses.asdict(cfg)})

    try:
        while step < cfg.steps:
            window = stream_windows(splits.train, cfg.streams, cfg.seq_len, step, overlap=1)
            params, opt_state, h, loss = train_step(state.params, state.opt_state, state.h, window)
            state = TrainState(params, opt_state, h)
            step += 1
            train_bits = float(loss)
            if not math.isfinite(train_bits):
                raise FloatingPointError(f"training diverged at step {step} (loss {train_bits}); lower --lr")
            rec = {"train_bits_per_byte": train_bits, "bytes_seen": step * tokens_per_step, **baselines}
            if cfg.eval_every and step % cfg.eval_every == 0:
                rec["valid_prefix_bits_per_byte"] = evaluate(state.params, valid_prefix)
            log.log(step, rec)
            if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                checkpoint()
        valid_bits = evaluate(state.params, splits.valid)
        # the egg recipe's periodic held-out bytes (64 streams x 1,024 bytes), for a like-for-like number
        egg_windows = heldout_windows(np.asarray(splits.valid), EGG_EVAL_BYTES, EGG_EVAL_STREAMS,
                                      max_window=EGG_EVAL_BYTES // EGG_EVAL_STREAMS)[:, 0]
        egg_ngram = ngram_bits_on_windows(splits.train, egg_windows)
        log.log(step, {"valid_bits_per_byte": valid_bits, "bytes_seen": step * tokens_per_step, **baselines})
        result = {
            "valid_bits_per_byte": valid_bits,
            **baselines,
            "egg_eval_bits_per_byte": float(bp.window_bits(state.params, egg_windows, cfg.mlp_activation)),
            "bigram_egg_eval_bits_per_byte": egg_ngram["bigram"],
            "unigram_egg_eval_bits_per_byte": egg_ngram["unigram"],
            "unigram_train_bits_per_byte": ngram["unigram_train"],
            "bigram_train_bits_per_byte": ngram["bigram_train"],
            "train_bits_per_byte": train_bits,
            "steps": step,
            "bytes_seen": step * tokens_per_step,
            "valid_bytes": len(splits.valid),
            "train_bytes": len(splits.train),
            "num_params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(state.params))),
            "wall_s": round(log.elapsed, 3),
            "session_wall_s": round(time.perf_counter() - t0, 3),
            "dataset": cfg.dataset,
            "run_dir": str(run_dir),
        }
        log.write_json("result", result)
    finally:
        log.close()
    return result
