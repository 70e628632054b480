"""Equal-budget hyperparameter search for countdown-mini: EGGROLL and GRPO, the same number of
trials each, resumable.

    eggroll search-countdown --trials 12 --seeds 0 --budget-s 60      # (CLI entry: see docs/LLM.md)
    eggroll search-countdown --trials 12 --train-params all --out-dir runs/search-all

Each method gets `trials` draws from its grid (SPACES, or JSON --space {"eggroll": {field:
[choices]}, ...} replacing the named fields' choices): EGGROLL sigma 0.004..0.02, learning
rate, population and prompts per generation; GRPO learning rate, samples per prompt,
temperature and prompts per step. Trial k runs `eggroll train countdown-mini` with that method
only, its draw, `seeds` fine-tuning seeds and `budget_s` seconds on `clock`; every trial starts
from ONE supervised checkpoint (out_dir/sft, trained by the first trial) and shares --base
(JSON of other countdown-mini fields, e.g. '{"hidden": 32}') and --train-params. The score is
the mean final held-out accuracy over the seeds. Trials alternate between the methods (EGGROLL
trial k, GRPO trial k, ...), so an interrupted search has spent the same budget on each.

Outputs in out_dir: <method>/trial<k>/ (the recipe's run directories), trials.jsonl (one line
per finished trial, appended; a restarted search skips them: the draws are fixed by --seed),
best.json (per method: best hyperparameters, score, standard error, the command that reruns
them). Trials are scored on a validation set (`--eval-set validation`: unseen problems disjoint
from the held-out test set and the training pool), never on the test set; then each method's
best reruns on --confirm-seeds (fresh fine-tuning seeds, <method>/confirm/) scored on the
held-out test set with the recipe's forgetting / Pass@K measures: best.json "confirm" is the
number to report.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..config import flag, flag_args
from ..runlog import write_json
from . import countdown_mini as cm

SPACES = {
    "eggroll": {"sigma": [0.004, 0.007, 0.01, 0.014, 0.02], "es_lr": [1e-4, 3e-4, 1e-3, 3e-3],
                "population": [32, 64, 128, 256], "es_prompts": [4, 8, 16, 32]},
    "grpo": {"grpo_lr": [1e-4, 3e-4, 1e-3, 3e-3], "group_size": [4, 8, 16], "grpo_temperature": [0.7, 1.0, 1.3],
             "grpo_prompts": [8, 16, 32]},
}
FIXED = ("strategies", "seeds", "seed", "run_dir", "sft_dir", "budget_s", "clock", "train_params", "resume", "progress",
         "eval_set")

_arg = flag


@dataclass
class Config:
    methods: str = _arg("eggroll,grpo", "methods searched, comma separated (each gets --trials trials)")
    trials: int = _arg(12, "trials per method (the same budget for each)")
    seeds: str = _arg("0", "fine-tuning seeds of every trial, comma separated")
    budget_s: float = _arg(60.0, "seconds of fine-tuning per trial and seed (on --clock)")
    clock: str = _arg("cpu", "budget clock: cpu or wall", ("cpu", "wall"))
    train_params: str = _arg("", "parameter groups both methods train (countdown-mini --train-params)")
    space: str = _arg("", 'JSON {"eggroll": {"field": [choices]}, "grpo": {...}} replacing those fields\' choices')
    base: str = _arg("", "JSON of other countdown-mini fields shared by every trial")
    confirm_seeds: str = _arg("1,2,3", "after the search: each method's best reruns on these fresh seeds, scored on "
                              "the held-out test set (empty: skip)")
    confirm_budget_s: float = _arg(0.0, "seconds per confirmation fine-tune (0: --budget-s)")
    seed: int = _arg(0, "seed of the search's draws")
    out_dir: str = _arg("runs/search-countdown-mini", "output directory")
    progress: bool = _arg(False, "progress of the trials")


def _json(text: str, what: str) -> dict:
    try:
        d = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--{what} must be a JSON object: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"--{what} must be a JSON object, got {text!r}")
    return d


def methods_of(cfg: Config) -> list[str]:
    ms = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    if not ms or any(m not in SPACES for m in ms):
        raise ValueError(f"methods must be a comma list of {', '.join(SPACES)}, got {cfg.methods!r}")
    return ms


def spaces(cfg: Config) -> dict:
    """The grid of each method: SPACES with --space's fields replaced (checked against the recipe)."""
    extra, out = _json(cfg.space, "space"), {}
    for m in methods_of(cfg):
        space = dict(SPACES[m])
        for k, v in dict(extra.get(m, {})).items():
            if k not in cm.STRATEGY_FIELDS[m] or k in FIXED:
                raise ValueError(f"--space: {k!r} is not a tunable countdown-mini field of {m} "
                                 f"({', '.join(f for f in cm.STRATEGY_FIELDS[m] if f not in FIXED)})")
            if not isinstance(v, list) or not v:
                raise ValueError(f"--space: {m}.{k} needs a non-empty list of choices, got {v!r}")
            space[k] = v
        out[m] = space
    bad = set(extra) - set(out)
    if bad:
        raise ValueError(f"--space names methods that are not searched: {sorted(bad)}")
    return out


def draws(cfg: Config, space: dict, method: str) -> list[dict]:
    """The method's `trials` draws, fixed by (seed, method): a restarted search redraws the same."""
    rng = random.Random(f"{cfg.seed}:{method}")
    return [{k: rng.choice(v) for k, v in sorted(space.items())} for _ in range(cfg.trials)]


def trial_config(cfg: Config, method: str, k: int | str, hp: dict, base: dict, confirm: bool = False) -> cm.Config:
    """Trial k of `method` (scored on the validation set), or with `confirm` its rerun on the
    confirmation seeds, scored on the held-out test set (run_dir <method>/confirm)."""
    fields = {f.name for f in dataclasses.fields(cm.Config)}
    bad = sorted(set(base) - fields) + sorted(set(base) & set(FIXED))
    if bad:
        raise ValueError(f"--base: {bad} are not countdown-mini fields a search may set")
    out = Path(cfg.out_dir)
    where = dict(seeds=cfg.confirm_seeds, budget_s=cfg.confirm_budget_s or cfg.budget_s, eval_set="test",
                 run_dir=str(out / method / "confirm")) if confirm else \
        dict(seeds=cfg.seeds, budget_s=cfg.budget_s, eval_set="validation", run_dir=str(out / method / f"trial{k}"))
    return cm.Config(**{**base, **hp, **where}, strategies=method, clock=cfg.clock, train_params=cfg.train_params,
                     sft_dir=str(out / "sft"), progress=cfg.progress)


def command(sub: cm.Config, hp: dict, base: dict) -> str:
    args = ["eggroll", "train", "countdown-mini", "--strategies", sub.strategies, "--sft-dir", sub.sft_dir,
            "--seeds", sub.seeds, "--budget-s", f"{sub.budget_s:g}", "--clock", sub.clock, "--eval-set", sub.eval_set]
    if sub.train_params:
        args += ["--train-params", sub.train_params]
    return shlex.join(args + flag_args({**base, **hp}))


def run(cfg: Config) -> dict:
    if cfg.trials < 1 or not cfg.budget_s > 0:
        raise ValueError(f"trials must be >= 1 and budget_s > 0, got {cfg.trials}, {cfg.budget_s}")
    grids, base = spaces(cfg), _json(cfg.base, "base")
    plan = {m: draws(cfg, grids[m], m) for m in grids}
    for m in plan:
        cm.validate(trial_config(cfg, m, 0, plan[m][0], base))  # bad settings fail before any training
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "trials.jsonl"
    done = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    seen = {(t["method"], t["trial"]) for t in done}
    for k in range(cfg.trials):
        for m in plan:  # alternate: equal budgets so far at any interruption
            if (m, k) in seen:
                continue
            sub = trial_config(cfg, m, k, plan[m][k], base)
            res = cm.run(sub)
            rec = {"method": m, "trial": k, "hp": plan[m][k], "score": res[f"{m}_accuracy"],
                   "stderr": res.get(f"{m}_accuracy_stderr"), "per_seed": res[f"{m}_accuracy_per_seed"],
                   "start_accuracy": res["start_accuracy"], "command": command(sub, plan[m][k], base)}
            done.append(rec)
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
    best = {}
    for m in plan:
        scored = [t for t in done if t["method"] == m and t["trial"] < cfg.trials and t["score"] is not None]
        top = max(scored, key=lambda t: t["score"]) if scored else None
        best[m] = top and {k: top[k] for k in ("trial", "hp", "score", "stderr", "command")}
        best[m] = best[m] and {**best[m], "trials": len(scored)}
    result = {"methods": list(plan), "trials_per_method": cfg.trials, "budget_s": cfg.budget_s, "clock": cfg.clock,
              "seeds": cfg.seeds, "train_params": cfg.train_params, "best": best, "out_dir": str(out)}
    write_json(out / "best.json", result)
    if cfg.confirm_seeds.strip():
        result["confirm"] = confirm(cfg, best, base)
        write_json(out / "best.json", result)
    return result


def confirm(cfg: Config, best: dict, base: dict) -> dict:
    """Each method's best draw rerun on the confirmation seeds, scored on the held-out test set
    (resumable: finished fine-tunes are reused) -> per method accuracy mean, stderr, per seed,
    the forgetting / coverage measures and the command."""
    out = {}
    for m, b in best.items():
        if not b:
            continue
        sub = trial_config(cfg, m, "confirm", b["hp"], base, confirm=True)
        res = cm.run(sub)
        out[m] = {"accuracy": res[f"{m}_accuracy"], "stderr": res[f"{m}_accuracy_stderr"],
                  "per_seed": res[f"{m}_accuracy_per_seed"], "start_accuracy": res["start_accuracy"],
                  "samples_per_s": res[f"{m}_samples_per_s"], "measures": res[f"{m}_measures"],
                  "command": command(sub, b["hp"], base)}
        print(json.dumps({"confirm": m, **{k: out[m][k] for k in ("accuracy", "stderr", "per_seed")}}), flush=True)
    return out
