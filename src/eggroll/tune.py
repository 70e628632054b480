"""`eggroll tune`: a small random search over the `rl` recipe's hyperparameters, for any env.

    eggroll tune --env CartPole-v1 --strategy eggroll --trials 20 --budget-steps 200000
    eggroll tune --env my_pkg.envs:make --strategy ppo --space '{"ppo_lr": [1e-4, 3e-4, 1e-3]}'

Each trial draws one value per hyperparameter uniformly from its list of choices (SPACES, or the
JSON `--space` mapping field -> choices, which replaces the defaults for the fields it names),
trains `seeds` seeds with eggroll.recipes.rl under the same budget, and scores the mean final
eval return. The paper tuned with 20 random-search trials per (algorithm, environment); its MPE
space is SPACES["es"] with pop {128 ... 4096} (here smaller populations, for a CPU). Outputs in
out_dir: trial<k>/ (the recipe's run directories), trials.jsonl (one line per trial, appended as
trials finish; an interrupted search resumes after the last finished trial), best.json, and the
final JSON with the best hyperparameters and the `eggroll train rl` command that reruns them.
`--record` makes the best configuration the (environment, method)'s tuned preset: it is written
to eggroll/recipes/rl_tuned.json with its score and this search's command, and every later run
of that pair starts from it (rl_presets.TUNED; flags still override it). A search starts from the
presets in force, tuned ones included, for the fields it does not sample.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shlex
from dataclasses import dataclass
from pathlib import Path

from .recipes import rl as recipe
from .recipes import rl_presets
from .runlog import write_json
from .config import flag, flag_args

SPACES = {
    "es": {
        "population": [32, 64, 128, 256],
        "sigma": [0.03, 0.05, 0.1, 0.2, 0.3, 0.5],
        "lr": [0.005, 0.01, 0.02, 0.05, 0.1],
        "lr_decay": [0.3, 0.7, 1.0],
        "activation": ["tanh", "pqn"],
        "shaping": ["centered_rank", "z_score"],
    },
    "ppo": {
        "ppo_lr": [1e-4, 3e-4, 1e-3],
        "ent_coef": [0.0, 0.005, 0.01],
        "num_envs": [8, 16, 32],
        "rollout_len": [64, 128],
        "ppo_epochs": [2, 4],
        "minibatches": [2, 4],
    },
}


_arg = flag  # Config field -> CLI flag (eggroll.config.flag)


@dataclass
class Config:
    env: str = _arg("CartPole-v1", "environment name or module:function")
    strategy: str = _arg("eggroll", "training method", recipe.METHODS)
    trials: int = _arg(20, "number of random-search trials")
    seeds: int = _arg(1, "seeds per trial")
    budget_steps: int = _arg(200_000, "env steps per seed")
    budget_wall_s: float = _arg(0.0, "training seconds per seed (0: no limit)")
    hidden: str = _arg("", "hidden sizes for every trial (empty: the env's preset)")
    space: str = _arg("", 'JSON {"field": [choices]} replacing the default choices of those fields')
    seed: int = _arg(0, "seed of the search itself")
    out_dir: str = _arg("", "output directory; empty: runs/tune-<env>-<strategy>")
    progress: bool = _arg(False, "progress bars of the trials")
    record: bool = _arg(False, "make the best configuration this (env, strategy)'s tuned preset (recipes/rl_tuned.json)")

# Config fields that define a search (what `search_command` reproduces).
SEARCH_FIELDS = ("env", "strategy", "trials", "seeds", "budget_steps", "budget_wall_s", "hidden", "space", "seed")


def search_space(cfg: Config) -> dict[str, list]:
    space = dict(SPACES["ppo" if cfg.strategy == "ppo" else "es"])
    if cfg.space:
        try:
            extra = json.loads(cfg.space)
        except json.JSONDecodeError as e:
            raise ValueError(f"--space must be a JSON object field -> list of choices: {e}") from None
        fields = {f.name for f in dataclasses.fields(recipe.Config)}
        for k, v in extra.items():
            if k not in fields or k in ("env", "strategy", "seeds", "seed", "run_dir", "budget_steps"):
                raise ValueError(f"--space: {k!r} is not a tunable field of the rl recipe")
            if not isinstance(v, list) or not v:
                raise ValueError(f"--space: {k!r} needs a non-empty list of choices, got {v!r}")
        space.update(extra)
    return space


def sample(space: dict[str, list], rng: random.Random) -> dict:
    return {k: rng.choice(v) for k, v in sorted(space.items())}


def command(cfg: Config, hp: dict) -> str:
    args = ["eggroll", "train", "rl", "--env", cfg.env, "--strategy", cfg.strategy]
    if cfg.hidden:
        args += ["--hidden", cfg.hidden]
    return shlex.join(args + flag_args(hp))


def search_command(cfg: Config) -> str:
    return shlex.join(["eggroll", "tune", *flag_args({k: getattr(cfg, k) for k in SEARCH_FIELDS if getattr(cfg, k) != ""})])


def record(cfg: Config, result: dict) -> dict:
    """Write the search's best as TUNED[env][strategy] into rl_tuned.json (re-read first: other
    searches may have recorded since this process started) and into the loaded table."""
    table = rl_presets.read_tuned()
    table.setdefault(rl_presets.preset_key(cfg.env), {})[cfg.strategy] = {
        "hp": result["best"], "score": result["best_score"], "stderr": result["best_stderr"],
        "trials": result["trials"], "search": search_command(cfg)}
    rl_presets.TUNED_PATH.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    rl_presets.TUNED.clear()
    rl_presets.TUNED.update(table)
    return table


def run(cfg: Config) -> dict:
    if cfg.trials < 1 or cfg.seeds < 1:
        raise ValueError(f"trials and seeds must be >= 1, got {cfg.trials}, {cfg.seeds}")
    space = search_space(cfg)
    out = Path(cfg.out_dir or f"runs/tune-{cfg.env.replace('/', '_').replace(':', '_')}-{cfg.strategy}")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "trials.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    rng = random.Random(cfg.seed)
    draws = [sample(space, rng) for _ in range(cfg.trials)]  # fixed by the seed: resumable
    trials = list(done)
    for k in range(len(done), cfg.trials):
        hp = draws[k]
        rc = recipe.Config(env=cfg.env, strategy=cfg.strategy, seeds=cfg.seeds, budget_steps=cfg.budget_steps,
                           budget_wall_s=cfg.budget_wall_s, hidden=cfg.hidden or None, run_dir=str(out / f"trial{k}"),
                           progress=cfg.progress, **hp)
        try:
            res = recipe.run(rc)
            rec = {"trial": k, "hp": hp, "score": res["mean_return"], "stderr": res["stderr"],
                   "wall_s": res["wall_s"], "env_steps": res["env_steps"]}
        except ValueError as e:  # an invalid combination (e.g. rank > width) scores nothing
            rec = {"trial": k, "hp": hp, "score": None, "error": str(e)}
        trials.append(rec)
        with open(log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
    scored = [t for t in trials if t.get("score") is not None]
    if not scored:
        raise ValueError(f"no trial of {cfg.trials} produced a score; see {log}")
    best = max(scored, key=lambda t: t["score"])
    result = {"env": cfg.env, "strategy": cfg.strategy, "trials": len(trials), "best_score": best["score"],
              "best_stderr": best["stderr"], "best": best["hp"], "command": command(cfg, best["hp"]),
              "out_dir": str(out)}
    write_json(out / "best.json", result)
    if cfg.record:
        record(cfg, result)
        result["recorded"] = str(rl_presets.TUNED_PATH)
    return result
