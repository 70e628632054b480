"""countdown-mini: EGGROLL vs GRPO fine-tuning of a tiny transformer on Countdown, on a CPU.

    eggroll train countdown-mini                       # SFT once, then both fine-tunes, seed 0
    eggroll train countdown-mini --seeds 0,1,2 --budget-s 120 [--resume]

1. Problems. Three numbers in 1..10 and a target in 1..100 reachable with + - * / using every
   number exactly once (our builtin Countdown generator, same rules as reasoning-gym). Prompt
   "3 5 7>22:", answer "3*5+7" then EOS, a 22-character vocabulary (`CharTokenizer`). A fixed
   held-out set (never trained on): greedy decoding, reward 1 for a correct expression.
2. Supervised start. A tiny Qwen-style transformer (~150k params by default) learns from
   brute-force solutions (`solve_countdown`) with Adam until its held-out accuracy reaches
   `sft_target` (modest on purpose: RL has room to improve it) or `sft_max_steps`. The
   checkpoint, <run_dir>/sft, is reused by later runs with the same SFT settings.
   (Stages 1 and 2 live in eggroll.recipes.countdown_sft; the fine-tunes and reports here.)
3. Fine-tuning from it, EGGROLL (population x prompts greedy answers, group z-score fitness,
   low-rank noise on the weight matrices) and GRPO (prompts x group samples at temperature 1,
   clipped token-mean loss, Adam), both through `eggroll.tasks.finetune`, each for `budget_s`
   seconds of its steps (generation, decoding, scoring, updates; not the compilation -- one
   warm-up step, discarded -- nor the held-out evaluations). The clock is the process's CPU
   time by default (`--clock cpu`: on a shared machine wall-clock budgets measure the
   neighbours' load; on an idle 2-core machine CPU seconds are about twice wall seconds for
   both); `--clock wall` for a dedicated machine or a GPU. The held-out set is evaluated when
   the budget clock crosses a multiple of `eval_every_s` (and every `eval_every` steps if set)
   and at the end.

Each fine-tune is one run of the run harness (`eggroll.harness`) in run_dir/<strategy>-seed<k>
(config.json, metrics.jsonl, curve.png, checkpoint/, result.json): the budget is its budget stop
on the running total of step seconds (`cpu_s` / `step_s`), `--generations` caps its steps, the
prompts of step t are the t-th draw of a seeded stream, so `--resume` continues an interrupted
fine-tune exactly. A fine-tune finished in run_dir with the same settings is not repeated;
without --resume an interrupted one starts again from the SFT checkpoint. Rebuilt from the
fine-tunes after each one: run_dir/curves.jsonl (one line per evaluation: strategy, seed, step,
train_s on the budget clock, wall_s, accuracy, samples so far, ...), steps.jsonl (per step),
curves.png (accuracy vs budget clock) and result.json; the last line printed is
{"eggroll_accuracy", "grpo_accuracy", "start_accuracy", "budget_s", ...}, averaged over seeds.

Fair comparison: `--train-params all` (or a group list) trains the same parameters with both
methods; `eggroll.recipes.countdown_search` searches both with an equal trial budget. Each
fine-tune's result.json has "measures" (Pass@1..Pass@K at `--pass-k` samples, held-out NLL
before / after, drift ||theta - theta_0||); the top result.json their mean and standard error
over seeds as `<method>_measures`, and `<method>_accuracy_stderr`; "equal_wall": every method's
accuracy at the same training wall seconds (the shortest method's; the CPU budget gives the
methods different wall times). `--anchor-decay` (EGGROLL),
`--grpo-temperature`, `--compute-dtype bfloat16`; `--trace --max-new-tokens 112`: answers carry
a worked reasoning trace (docs/LLM.md).

Several processes (`--coordinator HOST:PORT --num-processes P --process-id I`): every process
trains the same SFT model and process 0 writes it; EGGROLL splits its members over every device
of every process (rewards cross: 12 bytes per (member, prompt) row), GRPO is data parallel
(gradients all-reduced); the step seconds are the slowest process's (8 bytes per step), so all
stop and evaluate at the same step. Process 0 writes; every process reads the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import optax

from .. import distributed, harness
from ..baselines.grpo import check_data_parallel, grpo_finetuner
from ..config import OPTIMIZERS, flag
from ..runlog import read_metrics, write_json
from ..tasks.finetune import BudgetClock, PromptStream, es_finetuner
from ..tasks.param_groups import group_kinds, group_mask, llm_kinds, masked_optimizer, parse_groups
from ..tasks.finetune import COMPUTE_DTYPES as DTYPES
from .countdown_sft import (PROMPT_LEN, SFT_FIELDS, TRACE_TOKENS, held_out_accuracy, log, make_task, make_tokenizer,
                            measure, model_config, problem_sets, supervised_start, validation_set)

SHARED_FIELDS = ("train_params", "compute_dtype")  # both methods'
STRATEGY_FIELDS = {"eggroll": ("population", "es_prompts", "sigma", "rank", "es_lr", "es_optimizer", "perturb_embeddings",
                               "anchor_decay") + SHARED_FIELDS,
                   "grpo": ("grpo_prompts", "group_size", "grpo_lr", "clip_eps", "kl_coef", "minibatches",
                            "grpo_temperature") + SHARED_FIELDS}
# a finished fine-tune is reused only if these match too (the budget and the end-of-run measurements)
BUDGET_FIELDS = ("budget_s", "clock", "generations", "pass_k", "pass_k_temperature", "eval_set")
NO_CAP = 10**9  # the step cap of a fine-tune when --generations is 0

ES_OPTIMIZERS = ("adam", "sgd")  # of config.OPTIMIZERS

_arg = flag  # Config field -> CLI flag (eggroll.config.flag)


@dataclass
class Config(harness.RunConfig):
    seeds: str = _arg("", "fine-tuning seeds, comma separated, each runs every strategy (empty: --seed)")
    budget_s: float = _arg(120.0, "seconds of fine-tuning per strategy and seed (on `clock`)")
    clock: str = _arg("cpu", "budget clock: cpu (process CPU time, robust on a shared machine) or wall",
                      ("cpu", "wall"))
    eval_every_s: float = _arg(15.0, "evaluate held-out accuracy every this many training seconds")
    eval_problems: int = _arg(512, "held-out problems")
    eval_set: str = _arg("test", "what the fine-tunes are evaluated on: test (the held-out set) or validation (as "
                         "many other unseen problems; what a hyperparameter search scores)", ("test", "validation"))
    strategies: str = _arg("eggroll,grpo", "which fine-tunes to run, comma separated")
    # model + supervised start
    hidden: int = _arg(64, "transformer width")
    layers: int = _arg(3, "transformer layers")
    sft_seed: int = _arg(0, "seed of the supervised start (shared by all fine-tuning seeds)")
    sft_problems: int = _arg(8000, "distinct supervised training problems")
    sft_batch: int = _arg(128, "supervised batch size")
    sft_lr: float = _arg(3e-3, "supervised Adam learning rate")
    sft_target: float = _arg(0.25, "stop supervised training at this held-out accuracy")
    sft_max_steps: int = _arg(3000, "supervised step limit")
    # EGGROLL
    population: int = _arg(128, "EGGROLL population (even, a multiple of the device count)")
    es_prompts: int = _arg(16, "EGGROLL prompts per generation (every member answers all)")
    sigma: float = _arg(0.004, "EGGROLL noise scale")
    rank: int = _arg(1, "EGGROLL perturbation rank")
    es_lr: float = _arg(3e-4, "EGGROLL learning rate")
    es_optimizer: str = _arg("adam", "EGGROLL optimizer", ES_OPTIMIZERS)
    perturb_embeddings: bool = _arg(True, "EGGROLL: low-rank noise on the embedding table too")
    anchor_decay: float = _arg(0.0, "EGGROLL: each generation theta <- theta - decay * (theta - theta_0) (0: off)")
    # GRPO
    grpo_prompts: int = _arg(16, "GRPO prompts per step")
    group_size: int = _arg(8, "GRPO samples per prompt")
    grpo_lr: float = _arg(3e-4, "GRPO Adam learning rate")
    clip_eps: float = _arg(0.2, "GRPO clip range")
    kl_coef: float = _arg(0.0, "GRPO KL coefficient (reference = the SFT checkpoint)")
    minibatches: int = _arg(1, "GRPO minibatches per step")
    grpo_temperature: float = _arg(1.0, "GRPO sampling temperature")
    # both
    train_params: str = _arg("", "parameter groups BOTH methods train: all, or a comma list of matrices, embeddings, "
                             "head, vectors (empty: each method's default: EGGROLL matrices (+ embeddings), GRPO all)")
    compute_dtype: str = _arg("float32", "dtype of generation and of GRPO's forward (masters stay float32)",
                              ("float32", "bfloat16"))
    pass_k: int = _arg(16, "at the end: samples per held-out problem for Pass@1..Pass@K (0: skip)")
    pass_k_temperature: float = _arg(1.0, "sampling temperature of the Pass@K samples")
    sft_dir: str = _arg("", "SFT checkpoint directory (empty: run_dir/sft); a search shares one")
    trace: bool = _arg(False, "answers carry a worked reasoning trace (74-94 tokens; needs --max-new-tokens "
                       f">= {TRACE_TOKENS}); reward from the final answer")
    # misc
    partial: float = _arg(0.0, "reward for a well-formed but wrong expression")
    max_new_tokens: int = _arg(14, "generated tokens per answer (incl. EOS)")
    # the run fields, per fine-tune
    generations: int = _arg(0, "step cap per fine-tune (0: none; the time budget stops it)")
    eval_every: int = _arg(0, "also evaluate every k fine-tuning steps (0: only every eval_every_s)")
    checkpoint_every: int = _arg(20, "checkpoint each fine-tune every k steps (0: only at its end)")
    seed: int = _arg(0, "the fine-tuning seed when --seeds is empty")
    run_dir: str = _arg("runs/countdown-mini", "run directory")
    time_limit: float = _arg(0.0, "stop a fine-tune after this many wall seconds (0: none); --resume continues it")
    progress: bool = _arg(True, "print progress to stderr")


def validate(cfg: Config) -> Config:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"countdown-mini config: {msg}")

    need(cfg.budget_s > 0 and cfg.eval_every_s > 0, "budget_s and eval_every_s must be > 0")
    need(cfg.clock in ("cpu", "wall"), f"clock must be cpu or wall, got {cfg.clock!r}")
    need(cfg.eval_set in ("test", "validation"), f"eval_set must be test or validation, got {cfg.eval_set!r}")
    need(cfg.population >= 2 and cfg.population % 2 == 0, f"population must be even >= 2, got {cfg.population}")
    need(cfg.group_size >= 2, f"group_size must be >= 2, got {cfg.group_size}")
    need(cfg.sigma > 0 and cfg.es_lr > 0 and cfg.grpo_lr > 0 and cfg.sft_lr > 0, "sigma and learning rates must be > 0")
    need(0 < cfg.sft_target <= 1, f"sft_target must be in (0, 1], got {cfg.sft_target}")
    need(cfg.hidden % 16 == 0 and cfg.hidden >= 16, f"hidden must be a multiple of 16, got {cfg.hidden}")
    need(all(s in ("eggroll", "grpo") for s in _csv(cfg.strategies)), f"strategies must be eggroll/grpo, got {cfg.strategies!r}")
    need(cfg.max_new_tokens >= 12, "max_new_tokens must be >= 12 (longest solution + EOS)")
    need(not cfg.trace or cfg.max_new_tokens >= TRACE_TOKENS,
         f"--trace needs --max-new-tokens >= {TRACE_TOKENS} (the longest traced answer + EOS), got {cfg.max_new_tokens}")
    need(0 <= cfg.anchor_decay < 1, f"anchor_decay must be in [0, 1), got {cfg.anchor_decay}")
    need(cfg.grpo_temperature > 0 and cfg.pass_k >= 0 and cfg.pass_k_temperature > 0,
         "grpo_temperature and pass_k_temperature must be > 0, pass_k >= 0")
    need(cfg.compute_dtype in DTYPES, f"compute_dtype must be float32 or bfloat16, got {cfg.compute_dtype!r}")
    if cfg.train_params:
        parse_groups(cfg.train_params)
    need(min(cfg.generations, cfg.eval_every, cfg.checkpoint_every) >= 0 and math.isfinite(cfg.time_limit)
         and cfg.time_limit >= 0, "generations, eval_every, checkpoint_every and time_limit must be >= 0")
    if "eggroll" in _csv(cfg.strategies):
        harness.check_population(cfg.population)  # every device of every process
    if "grpo" in _csv(cfg.strategies):
        check_data_parallel(cfg.grpo_prompts, cfg.group_size, cfg.minibatches)
    _ = seeds_of(cfg)
    return cfg


def _csv(s: str) -> list[str]:
    return [p.strip() for p in str(s).split(",") if p.strip()]


def seeds_of(cfg: Config) -> list[int]:
    try:
        return [int(s) for s in _csv(cfg.seeds)] or [cfg.seed]
    except ValueError:
        raise ValueError(f"seeds must be comma-separated integers, got {cfg.seeds!r}") from None


# what every fine-tune shares: model config, tokenizer, task, problems and the SFT start
Setup = namedtuple("Setup", "mcfg tok task held train params0 start_acc sft_meta")


def trajectory(strategy: str) -> tuple:
    return SFT_FIELDS + STRATEGY_FIELDS[strategy] + ("strategies", "seed", "partial", "max_new_tokens")


def fine_tune_config(cfg: Config, strategy: str, seed: int) -> Config:
    """The harness config of one fine-tune: its strategy and seed, its directory, evaluate() asked
    every step (it evaluates on the budget clock's schedule), no progress bar (no step count)."""
    return dataclasses.replace(cfg, strategies=strategy, seeds=str(seed), seed=seed, eval_every=1, progress=False,
                               run_dir=str(Path(cfg.run_dir) / f"{strategy}-seed{seed}"),
                               generations=cfg.generations or NO_CAP)


def make_finetuner(cfg: Config, setup: Setup):
    """(init, advance(state, examples), prompts per step, communication(state)) of cfg's strategy."""
    s, key = setup, jax.random.PRNGKey(cfg.seed)
    groups = parse_groups(cfg.train_params) if cfg.train_params else None
    dtype = DTYPES[cfg.compute_dtype]
    if cfg.strategies == "eggroll":
        kinds = group_kinds(s.params0, groups) if groups else llm_kinds(embeddings=cfg.perturb_embeddings)
        ft = es_finetuner(s.mcfg, s.tok, s.task, OPTIMIZERS[cfg.es_optimizer](cfg.es_lr), population=cfg.population,
                          sigma=cfg.sigma, rank=cfg.rank, kinds=kinds, prompt_len=PROMPT_LEN,
                          max_new_tokens=cfg.max_new_tokens, compute_dtype=dtype, anchor_decay=cfg.anchor_decay)
        ctx = ft.setup(key, s.params0)  # the noise context (+ anchor): built once, passed to every step, never saved
        return (lambda: ft.init(ctx, s.params0)), (lambda st, ex: ft.step(ctx, st, ex)), cfg.es_prompts, \
            (lambda st: ft.communication(cfg.es_prompts))
    opt = optax.adam(cfg.grpo_lr)
    ft = grpo_finetuner(s.mcfg, s.tok, s.task, masked_optimizer(opt, group_mask(s.params0, groups)) if groups else opt,
                        group_size=cfg.group_size, prompt_len=PROMPT_LEN, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.grpo_temperature, clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef,
                        ref_params=s.params0 if cfg.kl_coef else None, minibatches=cfg.minibatches,
                        compute_dtype=dtype)
    return (lambda: ft.init(key, s.params0)), ft.step, cfg.grpo_prompts, (lambda st: ft.communication(st, cfg.grpo_prompts))


def make_train(cfg: Config, setup: Setup, top: Config) -> harness.Train:
    """One fine-tune (cfg = fine_tune_config(top, ...)) for the harness. Budget: the running total
    of step seconds on cfg.clock (`cpu_s` / `step_s`, agreed across processes) reaching budget_s.
    Evaluations: each multiple of eval_every_s on that clock, every top.eval_every steps, the end."""
    strategy, seed = cfg.strategies, cfg.seed
    init, advance, n_prompts, comm = make_finetuner(cfg, setup)
    draws = PromptStream(setup.train, seed * 7919 + (strategy == "grpo"), n_prompts)
    t0 = time.perf_counter()  # compile outside the budget: one step on throw-away prompts, its result discarded
    advance(init(), [setup.train[i] for i in range(n_prompts)])
    compile_s = round(time.perf_counter() - t0, 2)
    clock, last = BudgetClock(cfg.clock, cfg.budget_s), {}

    def step(state, gen):
        (state, m), spent = clock.timed(advance, state, draws.at(gen))
        last.update(m)
        return state, {**m, **spent}

    def evaluate(state, gen):
        if gen == 0:  # the SFT checkpoint itself
            return {"accuracy": setup.start_acc}
        if not (clock.over() or gen >= cfg.generations or clock.crossed(cfg.eval_every_s)
                or (top.eval_every and gen % top.eval_every == 0)):
            return {}
        acc = held_out_accuracy(cfg, state.params, setup.mcfg, setup.tok, setup.task, setup.held)
        log(top, f"{strategy} seed {seed}: {clock.now:.0f}s ({cfg.clock}) step {gen} held-out accuracy {acc:.3f} "
                  f"(batch reward {last['mean_reward']:.3f}, no-signal {last['no_signal_frac']:.2f})")
        return {"accuracy": acc}

    def communication(state) -> dict:  # the fine-tuner's + the agreed step seconds (2 float32 per process)
        c, procs = comm(state), jax.process_count()
        return {**c, "comm_bytes_per_process": c.get("comm_bytes_per_process", 0) + 8 * (procs > 1),
                "comm_bytes_sent_per_process": c.get("comm_bytes_sent_per_process", 0) + 8 * (procs - 1),
                "clock_bytes_per_process": 8 * (procs > 1)}

    settings = {k: getattr(cfg, k) for k in trajectory(strategy) + BUDGET_FIELDS}
    return harness.Train(
        name=f"countdown-mini-{strategy}-seed{seed}", init=init, step=step, evaluate=evaluate,
        trajectory=trajectory(strategy), title=f"countdown-mini: {strategy}, seed {seed}",
        plot_keys=[("accuracy", "mean_reward"), ("no_signal_frac",)], totals=("cpu_s", "step_s", "samples"),
        stop=clock.stop, communication=communication,
        summary=lambda state, result: {"strategy": strategy, "seed": seed, "compile_s": compile_s, "settings": settings,
                                       **measure(cfg, setup, state.params)})


def _finished(sub: Config) -> dict | None:
    """The result of a fine-tune finished in sub.run_dir with sub's settings, else None."""
    try:
        result = json.loads((Path(sub.run_dir) / "result.json").read_text())
    except (OSError, ValueError):
        return None
    settings = {k: getattr(sub, k) for k in trajectory(sub.strategies) + BUDGET_FIELDS}
    return result if result.get("stopped") == "budget" and result.get("settings") == settings else None


def run(cfg: Config) -> dict:
    validate(cfg)
    run_dir = Path(cfg.run_dir)
    if distributed.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", dataclasses.asdict(cfg))
    tok, task = make_tokenizer(cfg), make_task(cfg)
    mcfg = model_config(cfg, tok.vocab_size)
    held, train = problem_sets(cfg, task)
    setup = Setup(mcfg, tok, task, held, train, *supervised_start(cfg, mcfg, tok, task, held, train))
    if cfg.eval_set == "validation":  # the SFT start stays the same; only what the fine-tunes are scored on moves
        val = validation_set(cfg, task, held)
        setup = setup._replace(held=val, start_acc=held_out_accuracy(cfg, setup.params0, mcfg, tok, task, val))
    for seed in seeds_of(cfg):
        for strategy in _csv(cfg.strategies):
            sub = fine_tune_config(cfg, strategy, seed)
            # process 0 decides (it reads the run directory the others may not see)
            done = distributed.allgather_host(np.asarray([_finished(sub) is not None], np.int32)).reshape(-1)[0]
            if done:
                log(cfg, f"{strategy} seed {seed} already finished in {sub.run_dir}: skipped")
                continue
            harness.run(sub, lambda c: make_train(c, setup, cfg))
            distributed.barrier("countdown-mini fine-tune")  # process 0 has written its files
            write_outputs(cfg)
    return summarise(cfg, run_dir, write_outputs(cfg), setup.start_acc, setup.sft_meta)


def write_outputs(cfg: Config) -> list[dict]:
    """curves.jsonl and steps.jsonl of every fine-tune so far, from their metrics.jsonl (process 0
    writes) -> the evaluation records."""
    key = "cpu_s" if cfg.clock == "cpu" else "step_s"
    curves, steps = [], []
    for seed in seeds_of(cfg):
        for strategy in _csv(cfg.strategies):
            sub = fine_tune_config(cfg, strategy, seed)
            base, result = {"strategy": strategy, "seed": seed}, _finished(sub)
            recs = read_metrics(sub.run_dir)
            evals = []
            for r in recs:
                rec = {**base, "step": r["generation"], "train_s": round(r.get(key, 0.0), 3),
                       "wall_s": round(r.get("step_s", 0.0), 3)}
                if r["generation"] > 0:
                    skip = ("generation", "wall_s", "train_s", "accuracy", "cpu_s", "step_s")
                    steps.append({**rec, **{k: v for k, v in r.items() if k not in skip}})
                if "accuracy" in r:
                    evals.append({**rec, "accuracy": r["accuracy"], "samples": r.get("samples", 0),
                                  **{k: r[k] for k in ("no_signal_frac", "mean_reward") if k in r}})
            if evals and evals[0]["step"] == 0 and result:
                evals[0]["compile_s"] = result.get("compile_s")
            if evals and result:
                evals[-1]["final"] = True
            curves += evals
    if distributed.is_main_process():
        for name, recs in (("curves.jsonl", curves), ("steps.jsonl", steps)):
            (Path(cfg.run_dir) / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return curves


def stderr(xs) -> float | None:
    """Standard error of the mean (None for fewer than 2 values)."""
    return float(np.std(xs, ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else None


def plot_accuracy(records, seeds, strategies, path, title):
    """Held-out accuracy vs training seconds: one thin line per seed, colour per strategy."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for colour, s in zip(("tab:red", "tab:blue", "tab:green"), strategies):
        for i, seed in enumerate(seeds):
            pts = sorted((r["train_s"], r["accuracy"]) for r in records if r["strategy"] == s and r["seed"] == seed)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=colour, marker="o", markersize=3, alpha=0.8,
                        label=s if i == 0 else None)
    ax.set_xlabel("fine-tuning time (s on the budget clock; compilation and evaluation excluded)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def at_equal_wall(records: list[dict], seeds: list[int], strategies: list[str]) -> dict | None:
    """Every strategy's accuracy at the same training wall-clock seconds: the common extent of
    all finished fine-tunes' curves (bench.rl_compare; the budget clock may be CPU time, on which
    the methods' wall seconds differ), mean and standard error over seeds."""
    from ..bench import rl_compare

    curves = {}
    for s in strategies:
        per_seed = [[r for r in records if r["strategy"] == s and r["seed"] == seed] for seed in seeds]
        if not all(recs and recs[-1].get("final") for recs in per_seed):
            return None
        curves[s] = [{"wall": np.array([r["wall_s"] for r in recs]), "ret": np.array([r["accuracy"] for r in recs])}
                     for recs in per_seed]
    at = rl_compare.common_extent(curves, "wall")
    return {"wall_s": at, **{s: {k: v for k, v in rl_compare.at_extent(cs, "wall", at).items() if k != "at"}
                             for s, cs in curves.items()}}


def summarise(cfg: Config, run_dir: Path, records: list[dict], start_acc: float, sft_meta: dict) -> dict:
    seeds = seeds_of(cfg)
    finals = {(r["strategy"], r["seed"]): r for r in records if r.get("final") and r["seed"] in seeds}
    result = {"start_accuracy": start_acc, "budget_s": cfg.budget_s, "clock": cfg.clock, "seeds": seeds,
              "eval_set": cfg.eval_set,
              "num_params": sft_meta.get("num_params"), "sft_steps": sft_meta.get("steps"),
              "processes": jax.process_count(), "devices": jax.device_count()}
    for s in _csv(cfg.strategies):
        accs = [finals[(s, seed)]["accuracy"] for seed in seeds if (s, seed) in finals]
        result[f"{s}_accuracy"] = float(np.mean(accs)) if accs else None
        result[f"{s}_accuracy_per_seed"] = accs
        result[f"{s}_samples_per_s"] = float(np.mean([finals[(s, seed)]["samples"] / max(finals[(s, seed)]["train_s"], 1e-9)
                                                      for seed in seeds if (s, seed) in finals] or [0.0]))
        result[f"{s}_accuracy_stderr"] = stderr(accs)
        first = _finished(fine_tune_config(cfg, s, seeds[0])) or {}
        result[f"{s}_communication"] = first.get("communication", {})
        done = [r["measures"] for r in (_finished(fine_tune_config(cfg, s, seed)) for seed in seeds) if r and "measures" in r]
        result[f"{s}_measures"] = {k: {"mean": float(np.mean([d[k] for d in done])), "stderr": stderr([d[k] for d in done])}
                                   for k in (done[0] if done else {})}
    result["equal_wall"] = at_equal_wall(records, seeds, _csv(cfg.strategies))
    if distributed.is_main_process():
        plot_accuracy(records, seeds, _csv(cfg.strategies), run_dir / "curves.png",
                      f"countdown-mini: {'validation' if cfg.eval_set == 'validation' else 'held-out'} accuracy vs "
                      f"fine-tuning {cfg.clock} time (start {start_acc:.2f})")
        write_json(run_dir / "result.json", result)
    return result
