"""RL comparison: EGGROLL vs full-rank OpenES vs PPO on several environments, several seeds.

    eggroll bench rl --envs CartPole-v1,Pendulum-v1,MPE_simple_spread_v3 --seeds 3 --budget-wall-s 20

For every (env, method) it runs the `rl` recipe (eggroll.recipes.rl: same adapters, same MLP
sizes, same deterministic evaluation) with the same per-seed budget: `budget_steps` env steps
and, if set, `budget_wall_s` seconds of training wall clock (compilation and evaluations are
excluded, so every method and seed gets the same training time). Outputs in out_dir:

    <env>/<method>/...      the recipe's run directories (metrics.jsonl per seed)
    <env>.png               eval return vs training wall clock and vs env steps, one line per
                            method: mean over seeds, band = +- stderr (curves interpolated onto
                            a common grid up to the shortest seed's extent; env steps on a log
                            axis, since methods spend steps at very different rates)
    results.md              table: final eval return mean +- stderr per method, and the speed
                            ratio EGGROLL / OpenES: median seconds per generation (both run the
                            same population, horizon and MLP, so this is the cost of the noise)
    results.json            everything above as data (the CLI's final JSON line)

An (env, method) whose run directory already holds a result.json for the same seeds and budget
is not re-run (resume a long bench by running the same command again); `--report-only` rebuilds
the table and plots from whatever has finished, training nothing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..recipes import rl as recipe
from ..runlog import read_metrics, write_json
from ..tasks import rl as rlt

# kinetix/m/h17_thrustcontrol_left is the paper's Thrust Control Left (install: docs/RL.md; without
# Kinetix its row records the install error and the bench goes on)
DEFAULT_ENVS = ("CartPole-v1,Pendulum-v1,brax/inverted_double_pendulum,Game2048-v1,Navix-DoorKey-5x5-v0,"
                "Craftax-Classic-Symbolic-v1,kinetix/m/h17_thrustcontrol_left,MPE_simple_spread_v3,"
                "MPE_simple_speaker_listener_v4")


def _arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    envs: str = _arg(DEFAULT_ENVS, "comma-separated environment names")
    methods: str = _arg("eggroll,open_es,ppo", "comma-separated methods")
    seeds: int = _arg(3, "seeds per (env, method)")
    budget_steps: int = _arg(10**9, "env steps per seed")
    budget_wall_s: float = _arg(20.0, "training seconds per seed (0: no limit)")
    hidden: str = _arg("", "hidden sizes for every run (empty: each env's preset / 256,256,256)")
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


def _fmt(r: dict | None) -> str:
    return "—" if r is None else f"{r['mean_return']:.4g} ± {r['stderr']:.2g}"


def table(rows: list[dict], methods: list[str]) -> str:
    head = ["env", "suite", *methods, "s/gen EGGROLL", "s/gen OpenES", "EGGROLL/OpenES time", "params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        res = row["results"]
        eg, oe = res.get("eggroll"), res.get("open_es")
        sg = lambda r: "—" if r is None else f"{r['s_per_gen']:.3g}"
        ratio = f"{eg['s_per_gen'] / oe['s_per_gen']:.2f}" if eg and oe else "—"
        params = next((r["num_params"] for r in res.values() if r), "—")
        lines.append("| " + " | ".join([row["env"], row["suite"], *(_fmt(res.get(m)) for m in methods),
                                        sg(eg), sg(oe), ratio, str(params)]) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: Config) -> dict:
    envs = [e.strip() for e in cfg.envs.split(",") if e.strip()]
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in recipe.METHODS]
    if not envs or bad:
        raise ValueError(f"need at least one env and methods from {recipe.METHODS}; got envs={envs}, bad methods={bad}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(cfg.seeds))
    budget = f"{cfg.budget_wall_s:g} s" if cfg.budget_wall_s else f"{cfg.budget_steps} steps"
    rows, t0 = [], time.perf_counter()
    for env in envs:
        row = {"env": env, "suite": rlt.suite_of(env)[0], "results": {}, "errors": {}}
        curves = {}
        for method in methods:
            run_dir = out / _slug(env) / method
            rc = recipe.Config(env=env, strategy=method, seeds=cfg.seeds, budget_steps=cfg.budget_steps,
                               budget_wall_s=cfg.budget_wall_s, hidden=cfg.hidden or None, eval_every=cfg.eval_every,
                               eval_episodes=cfg.eval_episodes, run_dir=str(run_dir), progress=cfg.progress)
            key = {k: getattr(rc, k) for k in ("seeds", "budget_steps", "budget_wall_s", "hidden")}
            done = run_dir / "result.json"
            try:
                prev = json.loads(done.read_text()) if done.exists() else None
                if prev is None or prev.get("bench_key") != key:
                    if cfg.report_only:
                        raise FileNotFoundError(f"not run (no finished result in {run_dir})")
                    prev = {**recipe.run(rc), "bench_key": key}
                    write_json(done, prev)
                cs = seed_curves(run_dir, seeds)
                prev["s_per_gen"] = float(np.median([c["s_per_gen"] for c in cs]))
                row["results"][method], curves[method] = prev, cs
            except Exception as e:  # noqa: BLE001 -- one broken env/method must not lose the rest of the bench
                row["errors"][method] = f"{type(e).__name__}: {e}"[:400]
            print(json.dumps({"env": env, "method": method, "mean_return": row["results"].get(method, {}).get("mean_return"),
                              "error": row["errors"].get(method), "elapsed_s": round(time.perf_counter() - t0, 1)}),
                  flush=True)
        if curves:
            plot_env(env, curves, out / f"{_slug(env)}.png", budget)
        rows.append(row)
        (out / "results.md").write_text(table(rows, methods))
    summary = {"budget": budget, "seeds": cfg.seeds, "out_dir": str(out),
               "rows": [{"env": r["env"], "suite": r["suite"], "errors": r["errors"],
                         **{m: {k: r["results"][m][k] for k in ("mean_return", "stderr", "wall_s", "env_steps",
                                                               "s_per_gen", "compile_s", "num_params")}
                            for m in r["results"]}} for r in rows],
               "wall_s": round(time.perf_counter() - t0, 1), "config": dataclasses.asdict(cfg)}
    write_json(out / "results.json", summary)
    return summary
