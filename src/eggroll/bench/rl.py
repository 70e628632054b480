"""RL comparison: EGGROLL vs full-rank OpenES vs PPO on several environments, several seeds.

    eggroll bench rl --envs CartPole-v1,Pendulum-v1,MPE_simple_spread_v3 --seeds 3 --budget-wall-s 20
    eggroll bench rl --seeds 3 --budget-wall-s 10      # the 16 environments + 3 MPE tasks (DEFAULT_ENVS)
    eggroll bench rl --envs Pendulum-v1,Acrobot-v1 --budget-wall-s 0 --budget-steps 1000000 \
        --env-budgets '{"Pendulum-v1": 3000000}'      # a budget per env, sized so its curves flatten

For every (env, method) it runs the `rl` recipe (eggroll.recipes.rl: same adapters, same MLP
sizes, same deterministic evaluation) with the same per-seed budget: `budget_steps` env steps
and, if set, `budget_wall_s` seconds of training wall clock (compilation and evaluations are
excluded, so every method and seed gets the same training time). Outputs in out_dir:

    <env>/<method>/...      the recipe's run directories (metrics.jsonl per seed)
    <env>.png               eval return vs training wall clock and vs env steps, one line per
                            method: mean over seeds, band = +- stderr (curves interpolated onto
                            a common grid up to the shortest seed's extent; env steps on a log
                            axis, since methods spend steps at very different rates)
    results.md              table: per method the eval return at EQUAL ENV STEPS and at EQUAL
                            TRAINING SECONDS (mean +- stderr over seeds at the common extent,
                            normalised start -> best method; bench.rl_compare), the EGGROLL vs
                            OpenES verdict (better / competitive / worse by one standard error)
                            and its count, and the speed ratio EGGROLL / OpenES: median seconds
                            per generation (same population, horizon and MLP: the noise's cost)
    results.json            everything above as data (the CLI's final JSON line)

An (env, method) whose run directory already holds a result.json for the same seeds, budget and
resolved hyperparameters (presets included, tuned ones too) is not re-run (resume a long bench
by running the same command again); `--report-only` rebuilds the table and plots from whatever
has finished, training nothing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..recipes import rl as recipe
from . import rl_compare
from ..runlog import read_metrics, write_json
from ..tasks import rl as rlt

# 16 environments from every suite, the paper's named six among them (Pendulum-v1, brax inverted
# double pendulum, Craftax-Symbolic, Jumanji 2048, Kinetix Thrust Control Left -- install: docs/RL.md;
# without Kinetix its rows record the install error and the bench goes on -- Navix DoorKey-8x8), then
# the paper's three MPE tasks
SIXTEEN_ENVS = ("CartPole-v1", "Pendulum-v1", "Acrobot-v1", "MountainCarContinuous-v0", "Breakout-MinAtar",
                "brax/inverted_double_pendulum", "brax/inverted_pendulum", "Craftax-Symbolic-v1",
                "Craftax-Classic-Symbolic-v1", "Game2048-v1", "kinetix/m/h17_thrustcontrol_left",
                "kinetix/m/h16_thrustcontrol_right", "Navix-DoorKey-8x8-v0", "Navix-DoorKey-5x5-v0",
                "Navix-Empty-8x8-v0", "Navix-FourRooms-v0")
MPE_ENVS = ("MPE_simple_spread_v3", "MPE_simple_speaker_listener_v4", "MPE_simple_reference_v3")
DEFAULT_ENVS = ",".join(SIXTEEN_ENVS + MPE_ENVS)


def _arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    envs: str = _arg(DEFAULT_ENVS, "comma-separated environment names")
    methods: str = _arg("eggroll,open_es,ppo", "comma-separated methods")
    seeds: int = _arg(3, "seeds per (env, method)")
    budget_steps: int = _arg(10**9, "env steps per seed")
    env_budgets: str = _arg("", 'JSON {"env": steps} replacing budget_steps for the envs it names (size each env\'s budget)')
    budget_wall_s: float = _arg(20.0, "training seconds per seed (0: no limit)")
    hidden: str = _arg("", "hidden sizes for every run (empty: each env's preset / 256,256,256)")
    population: int = _arg(0, "ES population for every run (0: each env's preset)")
    eval_every: int = _arg(2, "evaluate every k generations / updates")
    eval_episodes: int = _arg(8, "episodes per evaluation")
    out_dir: str = _arg("runs/bench-rl", "output directory")
    report_only: bool = _arg(False, "train nothing: rebuild the table and plots from finished runs in out_dir")
    progress: bool = _arg(False, "progress bars")


def _slug(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")


def seed_curves(run_dir: Path, seeds: list[int]) -> list[dict]:
    """Per seed: arrays of (train_s, env_steps, eval_return) at the evaluations, and s/generation."""
    out = []
    for s in seeds:
        recs = read_metrics(run_dir / f"seed{s}")
        ev = [r for r in recs if r.get("eval_return") is not None]
        t = np.array([r.get("train_s", 0.0) for r in recs])
        per_gen = float(np.median(np.diff(t[1:]))) if len(t) > 2 else (float(t[-1]) if len(t) > 1 else float("nan"))
        out.append({"wall": np.array([r.get("train_s", 0.0) for r in ev]), "steps": np.array([r["env_steps"] for r in ev]),
                    "ret": np.array([r["eval_return"] for r in ev]), "s_per_gen": per_gen})
    return out


def mean_band(curves: list[dict], x: str, n: int = 60, log: bool = False):
    """Common grid up to the shortest seed's extent (geometric from the first evaluation after 0
    if log); mean and stderr over seeds of the interpolated returns."""
    hi = min(c[x][-1] for c in curves)
    lo = min((c[x][c[x] > 0][0] for c in curves if (c[x] > 0).any()), default=0)
    if hi <= 0:
        grid = np.zeros(1)
    else:
        grid = np.geomspace(min(lo, hi), hi, n) if log and lo > 0 else np.linspace(0, hi, n)
    ys = np.stack([np.interp(grid, c[x], c["ret"]) for c in curves])
    se = ys.std(0, ddof=1) / np.sqrt(len(ys)) if len(ys) > 1 else np.zeros(len(grid))
    return grid, ys.mean(0), se


def plot_env(env: str, curves: dict[str, list[dict]], path: Path, budget: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, cs in curves.items():
        for ax, x, label in ((axes[0], "wall", "training wall clock (s)"), (axes[1], "steps", "env steps (log)")):
            g, m, se = mean_band(cs, x, log=x == "steps")
            ax.plot(g, m, label=method)
            ax.fill_between(g, m - se, m + se, alpha=0.25)
            ax.set_xlabel(label)
    axes[1].set_xscale("log")
    axes[0].set_ylabel(f"eval return (mean ± stderr, {len(next(iter(curves.values())))} seeds)")
    axes[0].legend()
    fig.suptitle(f"{env} ({budget})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _at(row: dict, x: str, method: str) -> str:
    c = row.get("compare")
    p = c and c[x]["methods"].get(method)
    return "—" if not p else f"{p['mean']:.4g} ± {p['stderr']:.2g} ({c[x]['normalised'][method]:.2f})"


def table(rows: list[dict], methods: list[str]) -> str:
    """Markdown: per env the return at equal env steps and at equal training seconds (each method's
    mean ± stderr over seeds at the common extent, normalised in brackets; rl_compare), the
    EGGROLL-vs-OpenES verdict, and seconds per generation."""
    head = ["env", "suite", "equal steps", *methods, "EGGROLL vs OpenES", "equal seconds", *methods,
            "s/gen EGGROLL", "s/gen OpenES", "EGGROLL/OpenES time", "params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        res, c = row["results"], row.get("compare") or {}
        eg, oe = res.get("eggroll"), res.get("open_es")
        sg = lambda r: "—" if r is None else f"{r['s_per_gen']:.3g}"  # noqa: E731
        ratio = f"{eg['s_per_gen'] / oe['s_per_gen']:.2f}" if eg and oe else "—"
        params = next((r["num_params"] for r in res.values() if r), "—")
        ext = lambda x, f: f.format(c[x]["extent"]) if c else "—"  # noqa: E731
        errs = "; ".join(f"{m}: {e}" for m, e in row["errors"].items())
        lines.append("| " + " | ".join([row["env"] + (f" (errors: {errs[:120]})" if errs else ""), row["suite"],
                                        ext("steps", "{:.3g}"), *(_at(row, "steps", m) for m in methods),
                                        c.get("verdict") or "—", ext("wall", "{:.3g} s"),
                                        *(_at(row, "wall", m) for m in methods), sg(eg), sg(oe), ratio,
                                        str(params)]) + " |")
    verdicts = [r["compare"]["verdict"] for r in rows if r.get("compare") and r["compare"]["verdict"]]
    if verdicts:
        count = {v: verdicts.count(v) for v in ("better", "competitive", "worse")}
        lines.append(f"\nEGGROLL vs OpenES at equal env steps over {len(verdicts)} environments: better {count['better']}, "
                     f"competitive {count['competitive']}, worse {count['worse']} (one combined standard error); "
                     f"EGGROLL >= OpenES within one standard error on {len(verdicts) - count['worse']}.")
    return "\n".join(lines) + "\n"


def speed(rows: list[dict]) -> dict:
    """Per env where both ran: EGGROLL's and OpenES's median seconds per generation and their ratio."""
    out = {}
    for r in rows:
        eg, oe = r["results"].get("eggroll"), r["results"].get("open_es")
        if eg and oe:
            out[r["env"]] = {"eggroll_s_per_gen": eg["s_per_gen"], "open_es_s_per_gen": oe["s_per_gen"],
                             "eggroll_over_open_es": eg["s_per_gen"] / oe["s_per_gen"]}
    return out


def env_budgets(cfg: Config, envs: list[str]) -> dict[str, int]:
    """Env steps per seed for each env: budget_steps, or its entry in the --env-budgets JSON."""
    try:
        own = json.loads(cfg.env_budgets) if cfg.env_budgets else {}
    except json.JSONDecodeError as e:
        raise ValueError(f'--env-budgets must be a JSON object {{"env": steps}}: {e}') from None
    bad = {k: v for k, v in own.items() if k not in envs or not isinstance(v, int) or v < 1} if isinstance(own, dict) else own
    if bad:
        raise ValueError(f"--env-budgets: {bad} -- each key one of --envs, each value a positive integer of env steps")
    return {e: own.get(e, cfg.budget_steps) for e in envs}


def _budget_label(cfg: Config, steps: int) -> str:
    return f"{steps} steps" + (f" or {cfg.budget_wall_s:g} s" if cfg.budget_wall_s else "")


def run(cfg: Config) -> dict:
    envs = [e.strip() for e in cfg.envs.split(",") if e.strip()]
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in recipe.METHODS]
    if not envs or bad:
        raise ValueError(f"need at least one env and methods from {recipe.METHODS}; got envs={envs}, bad methods={bad}")
    steps = env_budgets(cfg, envs)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(cfg.seeds))
    budget = _budget_label(cfg, cfg.budget_steps)
    rows, t0 = [], time.perf_counter()
    for env in envs:
        row = {"env": env, "suite": rlt.suite_of(env)[0], "budget_steps": steps[env], "results": {}, "errors": {}}
        curves = {}
        for method in methods:
            run_dir = out / _slug(env) / method
            rc = recipe.Config(env=env, strategy=method, seeds=cfg.seeds, budget_steps=steps[env],
                               budget_wall_s=cfg.budget_wall_s, hidden=cfg.hidden or None, eval_every=cfg.eval_every,
                               population=cfg.population or None,
                               eval_episodes=cfg.eval_episodes, run_dir=str(run_dir), progress=cfg.progress)
            # the resolved hyperparameters (hidden and population among them): a changed, e.g. tuned, preset re-runs
            key = {**{k: getattr(rc, k) for k in ("seeds", "budget_steps", "budget_wall_s")},
                   "hp": json.loads(json.dumps(recipe.resolve(rc)))}
            done = run_dir / "result.json"
            try:
                prev = json.loads(done.read_text()) if done.exists() else None
                if cfg.report_only and prev is None:  # report-only takes whatever finished there
                    raise FileNotFoundError(f"not run (no finished result in {run_dir})")
                if not cfg.report_only and (prev is None or prev.get("bench_key") != key):
                    prev = {**recipe.run(rc), "bench_key": key}
                    write_json(done, prev)
                cs = seed_curves(run_dir, seeds)
                prev["s_per_gen"] = float(np.median([c["s_per_gen"] for c in cs]))
                row["results"][method], curves[method] = prev, cs
            except Exception as e:  # noqa: BLE001 -- one broken env/method must not lose the rest of the bench
                row["errors"][method] = f"{type(e).__name__}: {e}"[:400]
            got = row["results"].get(method, {})
            print(json.dumps({"env": env, "method": method, "mean_return": got.get("mean_return"),
                              "s_per_gen": got.get("s_per_gen"), "error": row["errors"].get(method),
                              "elapsed_s": round(time.perf_counter() - t0, 1)}), flush=True)
        if curves:
            plot_env(env, curves, out / f"{_slug(env)}.png", _budget_label(cfg, steps[env]))
            row["compare"] = rl_compare.compare(curves)
        rows.append(row)
        (out / "results.md").write_text(table(rows, methods))
    summary = {"budget": budget, "seeds": cfg.seeds, "out_dir": str(out),
               "rows": [{"env": r["env"], "suite": r["suite"], "budget_steps": r["budget_steps"], "errors": r["errors"],
                         "compare": r.get("compare"),
                         **{m: {k: r["results"][m][k] for k in ("mean_return", "stderr", "wall_s", "env_steps",
                                                               "s_per_gen", "compile_s", "num_params")}
                            for m in r["results"]}} for r in rows],
               "speed": speed(rows), "wall_s": round(time.perf_counter() - t0, 1), "config": dataclasses.asdict(cfg)}
    write_json(out / "results.json", summary)
    return summary
