"""The `rl` recipe's hyperparameters: DEFAULTS, per-environment PRESETS, TUNED presets and their resolution.

Every run starts from DEFAULTS; PRESETS[preset_key(env)] overrides them for its environment:
"ppo" for PPO; "es" for both ES methods, then "eggroll" / "open_es" for that method alone (a
method's own entry wins, and falls back to "es" for the fields it does not name); then
TUNED[env][method]["hp"], the best configuration an `eggroll tune` search found for that
(environment, method) -- rl_tuned.json, written by `eggroll tune --record`, each entry with its
score and the search command; the flags given (the Config fields that are not None, and the
switches anneal_lr / clip_vloss, which are plain booleans) override all of them:
`resolve(cfg)` returns the result, `canonical(cfg)` compares a field's value through it (what
--resume checks).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import hidden_sizes
from ..tasks import rl as rlt

if TYPE_CHECKING:
    from .rl import Config

# Hyperparameters every run starts from (flags and presets override them).
DEFAULTS: dict[str, Any] = {
    "population": 64, "sigma": 0.1, "rank": 1, "lr": 0.02, "lr_decay": 1.0, "optimizer": "adam", "hidden": "256,256,256",
    "activation": "tanh", "shaping": "centered_rank", "episodes": 1, "max_steps": 0,
    # PPO
    "ppo_lr": 3e-4, "num_envs": 16, "rollout_len": 128, "ppo_epochs": 4, "minibatches": 4, "gamma": 0.99, "gae_lambda": 0.95,
    "clip_eps": 0.2, "ent_coef": 0.01, "vf_coef": 0.5, "max_grad_norm": 0.5, "grad_reduce": "gather",
    "anneal_lr": True, "clip_vloss": True,
    # every method
    "obs_norm": False,
}

# Per-environment presets. "es" applies to eggroll and open_es, "open_es" / "eggroll" to that
# method alone (over "es"), "ppo" to PPO. MPE values are the paper's appendix choices for EGGROLL
# (3x64, lr 0.01, AdamW, rank 1; "no rank transform" -> z_score), the OpenES values the paper
# tuned differently (simple_reference: tanh, sigma 0.3, rank transform on; speaker_listener:
# decay 0.3; the fields it does not name stay EGGROLL's) and its IPPO baseline (lr 1e-3, 4 epochs,
# 4 minibatches, entropy 0.01). The others are hand-set for a small CPU budget (not from the paper;
# `eggroll tune` searches them).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "MPE_simple_spread_v3": {
        "es": {"activation": "tanh", "lr": 0.01, "lr_decay": 0.7, "hidden": "64,64,64", "population": 128,
                   "optimizer": "adamw", "rank": 1, "sigma": 0.5, "shaping": "z_score"},
        "ppo": {"hidden": "64,64,64", "ppo_lr": 1e-3, "ppo_epochs": 4, "minibatches": 4, "ent_coef": 0.01}},
    "MPE_simple_speaker_listener_v4": {
        "es": {"activation": "tanh", "lr": 0.01, "lr_decay": 0.7, "hidden": "64,64,64", "population": 512,
                   "optimizer": "adamw", "rank": 1, "sigma": 0.5, "shaping": "centered_rank"},
        "open_es": {"lr_decay": 0.3},
        "ppo": {"hidden": "64,64,64", "ppo_lr": 1e-3, "ppo_epochs": 4, "minibatches": 4, "ent_coef": 0.01}},
    "MPE_simple_reference_v3": {
        "es": {"activation": "pqn", "lr": 0.01, "lr_decay": 0.3, "hidden": "64,64,64", "population": 4096,
                   "optimizer": "adamw", "rank": 1, "sigma": 0.1, "shaping": "z_score"},
        "open_es": {"activation": "tanh", "sigma": 0.3, "shaping": "centered_rank"},
        "ppo": {"hidden": "64,64,64", "ppo_lr": 1e-3, "ppo_epochs": 4, "minibatches": 4, "ent_coef": 0.01}},
    "CartPole-v1": {"es": {"sigma": 0.1, "lr": 0.05}, "ppo": {"ppo_lr": 3e-4}},
    "Pendulum-v1": {"es": {"sigma": 0.1, "lr": 0.02, "max_steps": 200}, "ppo": {"ppo_lr": 1e-3, "ent_coef": 0.0}},
    "Acrobot-v1": {"es": {"sigma": 0.1, "lr": 0.05}},
    "brax/inverted_double_pendulum": {"es": {"sigma": 0.05, "lr": 0.02}, "ppo": {"ent_coef": 0.0}},
    "brax/hopper": {"es": {"sigma": 0.05, "lr": 0.02}, "ppo": {"ent_coef": 0.0}},
    "Game2048-v1": {"es": {"sigma": 0.1, "lr": 0.02, "max_steps": 500}},
    "Navix-DoorKey-5x5-v0": {"es": {"sigma": 0.1, "lr": 0.02}},
    "Navix-DoorKey-8x8-v0": {"es": {"sigma": 0.1, "lr": 0.02}},
    "Craftax-Classic-Symbolic-v1": {"es": {"sigma": 0.05, "lr": 0.02, "max_steps": 500}},
    "Craftax-Symbolic-v1": {"es": {"sigma": 0.05, "lr": 0.02, "max_steps": 500}},
}


# The tuned presets: {env key: {method: {"hp": {...}, "score": ..., "search": command}}} (tune.record).
TUNED_PATH = Path(__file__).with_name("rl_tuned.json")


def read_tuned() -> dict[str, dict[str, dict[str, Any]]]:
    """The tuned presets as rl_tuned.json holds them now ({} before the first --record)."""
    return json.loads(TUNED_PATH.read_text()) if TUNED_PATH.exists() else {}


TUNED = read_tuned()


def resolve(cfg: Config) -> dict:
    """Hyperparameters for this run: flags > TUNED[env][method] > PRESETS[env][method > es | ppo] > DEFAULTS."""
    hp = _base(cfg)
    hp.update({k: v for k, v in dataclasses.asdict(cfg).items() if k in DEFAULTS and v is not None})
    hp["hidden"] = hidden_sizes(hp["hidden"])
    return hp


def _base(cfg: Config) -> dict:
    key = preset_key(cfg.env)
    preset, tuned = PRESETS.get(key, {}), TUNED.get(key, {}).get(cfg.strategy, {}).get("hp", {})
    if cfg.strategy == "ppo":
        return {**DEFAULTS, **preset.get("ppo", {}), **tuned}
    return {**DEFAULTS, **preset.get("es", {}), **preset.get(cfg.strategy, {}), **tuned}


def preset_key(name: str) -> str:
    """The PRESETS key of an env name: 'mpe/simple_spread_v3' -> 'MPE_simple_spread_v3', 'hopper' -> 'brax/hopper'."""
    if ":" in name:
        return name
    suite, inner = rlt.suite_of(name)
    if suite == "mpe":
        return inner if inner.startswith("MPE_") else f"MPE_{inner}"
    return f"{suite}/{inner}" if suite in ("brax", "kinetix") else inner


def canonical(cfg: Config):
    """(field, value) -> the value it trains with (None: the preset's / default's)."""
    base = _base(cfg)

    def same(k, v):
        v = base[k] if v is None and k in base else v
        return hidden_sizes(v) if k == "hidden" else v

    return same
