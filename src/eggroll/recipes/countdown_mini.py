"""countdown-mini: EGGROLL vs GRPO fine-tuning of a tiny transformer on Countdown, on a CPU.

    eggroll train countdown-mini                       # SFT once, then both fine-tunes, seed 0
    eggroll train countdown-mini --seeds 0,1,2 --budget-s 120

1. Problems. Three numbers in 1..10 and a target in 1..100 reachable with + - * / using every
   number exactly once (our builtin Countdown generator, same rules as reasoning-gym). The
   prompt is "3 5 7>22:" and the answer an expression such as "3*5+7", then EOS, in a
   22-character vocabulary (`CharTokenizer`). A fixed held-out set (never trained on) measures
   accuracy: greedy decoding, reward 1 for a correct expression.
2. Supervised start. A tiny Qwen-style transformer (eggroll.models.transformer, ~150k params by
   default) learns from brute-force solutions (`solve_countdown`) with Adam and is stopped once
   its held-out accuracy reaches `sft_target` (modest, on purpose: RL has room to improve it)
   or after `sft_max_steps`. The checkpoint goes to <run_dir>/sft and is reused by later runs
   with the same SFT settings.
3. Fine-tuning from that same checkpoint, each for `budget_s` seconds (generation, decoding,
   scoring and updates count; compilation -- one warm-up step whose result is discarded -- and
   the periodic held-out evaluations do not). The clock is the process's CPU time by default
   (`--clock cpu`): on a machine shared with other jobs, wall-clock budgets measure the
   neighbours' load as much as the algorithms; on an idle 2-core machine CPU seconds are about
   twice wall seconds for both. `--clock wall` uses wall-clock time (use it on a dedicated
   machine or a GPU). Each record carries both. EGGROLL (population x prompts greedy generations per step, group z-score fitness,
   low-rank noise on the weight matrices) and GRPO (prompts x group samples at temperature 1,
   clipped token-mean loss, Adam). Both use `eggroll.tasks.finetune`, the same sampler and
   scorer.

Outputs in run_dir: curves.jsonl (one line per evaluation: strategy, seed, train_s, accuracy,
...), steps.jsonl (per-step diagnostics), curves.png (held-out accuracy vs wall clock),
result.json; the last line printed is {"eggroll_accuracy", "grpo_accuracy", "start_accuracy",
"budget_s", ...} with accuracies averaged over seeds. Evaluations are appended to curves.jsonl as
they happen; a (strategy, seed) run already finished in run_dir is not repeated (delete its
lines to redo it), an interrupted one is redone from the start.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import optax

from ..baselines import grpo as grpo_mod
from ..checkpoint import load_checkpoint, save_checkpoint
from ..models import transformer as tfm
from ..runlog import write_json
from ..tasks.char_tokenizer import CharTokenizer
from ..baselines.grpo import grpo_finetuner
from ..tasks.finetune import es_finetuner, evaluate_accuracy, llm_kinds
from ..tasks.reasoning import CountdownSpec, countdown_task, solve_countdown
from ..config import OPTIMIZERS, flag

SPEC = CountdownSpec(min_numbers=3, max_numbers=3, min_value=1, max_value=10, min_target=1, max_target=100)
TEMPLATE = "{numbers_str}>{target}:"
PROMPT_LEN = 13  # "10 10 10>100:"
SFT_FIELDS = ("hidden", "layers", "sft_seed", "sft_problems", "sft_batch", "sft_lr", "sft_target",
              "sft_max_steps", "eval_problems")

ES_OPTIMIZERS = ("adam", "sgd")  # of config.OPTIMIZERS

_arg = flag  # Config field -> CLI flag (eggroll.config.flag)


@dataclass
class Config:
    seeds: str = _arg("0", "fine-tuning seeds, comma separated (each runs EGGROLL and GRPO)")
    budget_s: float = _arg(120.0, "seconds of fine-tuning per strategy and seed (on `clock`)")
    clock: str = _arg("cpu", "budget clock: cpu (process CPU time, robust on a shared machine) or wall",
                      ("cpu", "wall"))
    eval_every_s: float = _arg(15.0, "evaluate held-out accuracy every this many training seconds")
    eval_problems: int = _arg(512, "held-out problems")
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
    population: int = _arg(128, "EGGROLL population (even)")
    es_prompts: int = _arg(16, "EGGROLL prompts per generation (every member answers all)")
    sigma: float = _arg(0.004, "EGGROLL noise scale")
    rank: int = _arg(1, "EGGROLL perturbation rank")
    es_lr: float = _arg(3e-4, "EGGROLL learning rate")
    es_optimizer: str = _arg("adam", "EGGROLL optimizer", ES_OPTIMIZERS)
    perturb_embeddings: bool = _arg(True, "EGGROLL: low-rank noise on the embedding table too")
    # GRPO
    grpo_prompts: int = _arg(16, "GRPO prompts per step")
    group_size: int = _arg(8, "GRPO samples per prompt")
    grpo_lr: float = _arg(3e-4, "GRPO Adam learning rate")
    clip_eps: float = _arg(0.2, "GRPO clip range")
    kl_coef: float = _arg(0.0, "GRPO KL coefficient (reference = the SFT checkpoint)")
    minibatches: int = _arg(1, "GRPO minibatches per step")
    # misc
    partial: float = _arg(0.0, "reward for a well-formed but wrong expression")
    max_new_tokens: int = _arg(14, "generated tokens per answer (incl. EOS)")
    run_dir: str = _arg("runs/countdown-mini", "run directory")
    progress: bool = _arg(True, "print progress to stderr")


def validate(cfg: Config) -> Config:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"countdown-mini config: {msg}")

    need(cfg.budget_s > 0 and cfg.eval_every_s > 0, "budget_s and eval_every_s must be > 0")
    need(cfg.clock in ("cpu", "wall"), f"clock must be cpu or wall, got {cfg.clock!r}")
    need(cfg.population >= 2 and cfg.population % 2 == 0, f"population must be even >= 2, got {cfg.population}")
    need(cfg.group_size >= 2, f"group_size must be >= 2, got {cfg.group_size}")
    need(cfg.sigma > 0 and cfg.es_lr > 0 and cfg.grpo_lr > 0 and cfg.sft_lr > 0, "sigma and learning rates must be > 0")
    need(0 < cfg.sft_target <= 1, f"sft_target must be in (0, 1], got {cfg.sft_target}")
    need(cfg.hidden % 16 == 0 and cfg.hidden >= 16, f"hidden must be a multiple of 16, got {cfg.hidden}")
    need(all(s in ("eggroll", "grpo") for s in _csv(cfg.strategies)), f"strategies must be eggroll/grpo, got {cfg.strategies!r}")
    need(cfg.max_new_tokens >= 12, "max_new_tokens must be >= 12 (longest solution + EOS)")
    _ = seeds_of(cfg)
    return cfg


def _csv(s: str) -> list[str]:
    return [p.strip() for p in str(s).split(",") if p.strip()]


def seeds_of(cfg: Config) -> list[int]:
    try:
        return [int(s) for s in _csv(cfg.seeds)]
    except ValueError:
        raise ValueError(f"seeds must be comma-separated integers, got {cfg.seeds!r}") from None


def model_config(cfg: Config, vocab: int) -> tfm.TransformerConfig:
    heads = cfg.hidden // 16
    return tfm.TransformerConfig(vocab_size=vocab, hidden_size=cfg.hidden, num_layers=cfg.layers, num_heads=heads,
                                 num_kv_heads=max(1, heads // 2), head_dim=16, intermediate_size=3 * cfg.hidden,
                                 max_position=64, tie_embeddings=False)


def make_task(cfg: Config):
    return countdown_task(SPEC, template=TEMPLATE, source="builtin", partial=cfg.partial,
                          answer_fn=lambda text: text.strip() or None)


def _key(ex) -> tuple:
    return (tuple(ex["numbers"]), ex["target"])


def problem_sets(cfg: Config, task):
    """(held-out examples, training pool with solver solutions); disjoint by (numbers, target)."""
    held = task.sample(random.Random(10_000 + cfg.sft_seed), cfg.eval_problems)
    held_keys = {_key(e) for e in held}
    rng, train, seen = random.Random(cfg.sft_seed), [], set()
    for _ in range(100 * cfg.sft_problems):
        if len(train) == cfg.sft_problems:
            break
        ex = task.sample(rng, 1)[0]
        k = _key(ex)
        if k in held_keys or k in seen:
            continue
        seen.add(k)
        ex["solution"] = solve_countdown(ex["numbers"], ex["target"]).replace(" ", "")
        train.append(ex)
    if len(train) < cfg.sft_problems:
        raise ValueError(f"countdown-mini: only {len(train)} distinct training problems found; lower sft_problems")
    return held, train


def _log(cfg, msg):
    if cfg.progress:
        print(f"[countdown-mini] {msg}", file=sys.stderr, flush=True)


def supervised_start(cfg: Config, mcfg, tok, task, held, train) -> tuple:
    """Train (or reuse) the SFT checkpoint -> (params, start accuracy)."""
    ckpt = Path(cfg.run_dir) / "sft"
    sft_cfg = {k: getattr(cfg, k) for k in SFT_FIELDS}
    template = tfm.init_params(jax.random.PRNGKey(cfg.sft_seed), mcfg)
    if (ckpt / "arrays.safetensors").exists():
        params, meta = load_checkpoint(ckpt, template)
        if meta.get("sft_config") == sft_cfg:
            _log(cfg, f"reusing SFT checkpoint {ckpt} (held-out accuracy {meta['accuracy']:.3f})")
            return params, meta["accuracy"], meta
        _log(cfg, f"SFT settings changed: retraining {ckpt}")
    prompts, plens = tok.encode_batch([task.prompt(e) for e in train], length=PROMPT_LEN)
    comps, clens = tok.encode_batch([e["solution"] + "" for e in train], left_pad=False, length=cfg.max_new_tokens)
    comps[np.arange(len(train)), clens] = tok.eos_id  # solution then EOS (fits: max_new_tokens >= 12)
    clens = clens + 1
    data = grpo_mod.build_batch(prompts, plens, comps, clens, np.zeros(len(train)), None)
    fn = grpo_mod.transformer_logprob_fn(mcfg)
    opt = optax.adam(cfg.sft_lr)

    @jax.jit
    def step(params, opt_state, idx):
        def loss(p):
            lp = grpo_mod.completion_logprobs(fn, p, data.tokens[idx], data.positions[idx], cfg.max_new_tokens)
            m = data.mask[idx]
            return -(lp * m).sum() / m.sum()
        val, g = jax.value_and_grad(loss)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, val

    params, opt_state = template, opt.init(template)
    rng = np.random.default_rng(cfg.sft_seed)
    acc, steps, t0 = 0.0, 0, time.perf_counter()
    while steps < cfg.sft_max_steps:
        n = min(100, cfg.sft_max_steps - steps)
        for _ in range(n):
            params, opt_state, loss = step(params, opt_state, rng.integers(0, len(train), cfg.sft_batch))
        steps += n
        acc = _accuracy(cfg, params, mcfg, tok, task, held)
        _log(cfg, f"SFT step {steps}: loss {float(loss):.3f}, held-out accuracy {acc:.3f}")
        if acc >= cfg.sft_target:
            break
    meta = {"accuracy": acc, "steps": steps, "sft_s": round(time.perf_counter() - t0, 1), "sft_config": sft_cfg,
            "num_params": tfm.num_params(params)}
    save_checkpoint(ckpt, params, meta)
    return params, acc, meta


def _accuracy(cfg, params, mcfg, tok, task, held) -> float:
    return evaluate_accuracy(params, mcfg, tok, task, held, prompt_len=PROMPT_LEN,
                             max_new_tokens=cfg.max_new_tokens)["accuracy"]


def finetune(cfg: Config, strategy: str, seed: int, params0, mcfg, tok, task, held, train, start_acc,
             steps_log, curves) -> list[dict]:
    """One fine-tuning run under the wall-clock budget -> its evaluation records."""
    key = jax.random.PRNGKey(seed)
    if strategy == "eggroll":
        opt = OPTIMIZERS[cfg.es_optimizer](cfg.es_lr)
        ft = es_finetuner(mcfg, tok, task, opt, population=cfg.population, sigma=cfg.sigma,
                          rank=cfg.rank, kinds=llm_kinds(embeddings=cfg.perturb_embeddings),
                          prompt_len=PROMPT_LEN, max_new_tokens=cfg.max_new_tokens)
        n_prompts = cfg.es_prompts
    else:
        ft = grpo_finetuner(mcfg, tok, task, optax.adam(cfg.grpo_lr), group_size=cfg.group_size,
                            prompt_len=PROMPT_LEN, max_new_tokens=cfg.max_new_tokens, clip_eps=cfg.clip_eps,
                            kl_coef=cfg.kl_coef, ref_params=params0 if cfg.kl_coef else None,
                            minibatches=cfg.minibatches)
        n_prompts = cfg.grpo_prompts
    state = ft.init(key, params0)
    rng = random.Random(seed * 7919 + (strategy == "grpo"))
    clock = time.process_time if cfg.clock == "cpu" else time.perf_counter
    # compile outside the budget: one step on throw-away prompts, its result discarded
    t0 = time.perf_counter()
    ft.step(state, [train[i] for i in range(n_prompts)])
    compile_s = time.perf_counter() - t0
    c_start, w_start = clock(), time.perf_counter()
    base = {"strategy": strategy, "seed": seed}
    records = [{**base, "step": 0, "train_s": 0.0, "wall_s": 0.0, "accuracy": start_acc, "samples": 0,
                "compile_s": round(compile_s, 2)}]
    curves.write(json.dumps(records[0]) + "\n")
    eval_c, eval_w, samples, step, next_eval = 0.0, 0.0, 0, 0, cfg.eval_every_s
    final = False
    while not final:  # the step that crosses the budget is the last, and is always evaluated
        state, m = ft.step(state, [train[rng.randrange(len(train))] for _ in range(n_prompts)])
        step += 1
        samples += int(m["samples"])
        train_s = clock() - c_start - eval_c
        wall_s = time.perf_counter() - w_start - eval_w
        steps_log.write(json.dumps({**base, "step": step, "train_s": round(train_s, 3), "wall_s": round(wall_s, 3),
                                    **m}) + "\n")
        final = train_s >= cfg.budget_s
        if train_s >= next_eval or final:
            c_e, w_e = clock(), time.perf_counter()
            acc = _accuracy(cfg, state.params, mcfg, tok, task, held)
            eval_c, eval_w = eval_c + clock() - c_e, eval_w + time.perf_counter() - w_e
            records.append({**base, "step": step, "train_s": round(train_s, 3), "wall_s": round(wall_s, 3),
                            "accuracy": acc, "samples": samples, "no_signal_frac": m["no_signal_frac"],
                            "mean_reward": m["mean_reward"]})
            if final:
                records[-1]["final"] = True
            curves.write(json.dumps(records[-1]) + "\n")  # as it happens: a killed run keeps its curve
            curves.flush()
            _log(cfg, f"{strategy} seed {seed}: {train_s:.0f}s ({cfg.clock}) step {step} held-out accuracy {acc:.3f} "
                      f"(batch reward {m['mean_reward']:.3f}, no-signal {m['no_signal_frac']:.2f})")
            next_eval = train_s + cfg.eval_every_s
    return records


def run(cfg: Config) -> dict:
    validate(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", dataclasses.asdict(cfg))
    tok, task = CharTokenizer(), make_task(cfg)
    mcfg = model_config(cfg, tok.vocab_size)
    held, train = problem_sets(cfg, task)
    params0, start_acc, sft_meta = supervised_start(cfg, mcfg, tok, task, held, train)

    curves_path = run_dir / "curves.jsonl"
    done = [json.loads(line) for line in curves_path.read_text().splitlines()] if curves_path.exists() else []
    finished = {(r["strategy"], r["seed"]) for r in done if r.get("final")}
    done = [r for r in done if (r["strategy"], r["seed"]) in finished]  # drop interrupted runs' partial curves
    curves_path.write_text("".join(json.dumps(r) + "\n" for r in done))
    with open(run_dir / "steps.jsonl", "a") as steps_log, open(curves_path, "a") as curves:
        for seed in seeds_of(cfg):
            for strategy in _csv(cfg.strategies):
                if (strategy, seed) in finished:
                    _log(cfg, f"{strategy} seed {seed} already in {curves_path}: skipped")
                    continue
                recs = finetune(cfg, strategy, seed, params0, mcfg, tok, task, held, train, start_acc, steps_log,
                                curves)
                curves.flush()
                done += recs
    return summarise(cfg, run_dir, done, start_acc, sft_meta)


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


def summarise(cfg: Config, run_dir: Path, records: list[dict], start_acc: float, sft_meta: dict) -> dict:
    seeds = seeds_of(cfg)
    finals = {(r["strategy"], r["seed"]): r for r in records if r.get("final") and r["seed"] in seeds}
    result = {"start_accuracy": start_acc, "budget_s": cfg.budget_s, "clock": cfg.clock, "seeds": seeds,
              "num_params": sft_meta.get("num_params"), "sft_steps": sft_meta.get("steps")}
    for s in _csv(cfg.strategies):
        accs = [finals[(s, seed)]["accuracy"] for seed in seeds if (s, seed) in finals]
        result[f"{s}_accuracy"] = float(np.mean(accs)) if accs else None
        result[f"{s}_accuracy_per_seed"] = accs
        result[f"{s}_samples_per_s"] = float(np.mean([finals[(s, seed)]["samples"] / finals[(s, seed)]["train_s"]
                                                      for seed in seeds if (s, seed) in finals] or [0.0]))
    plot_accuracy(records, seeds, _csv(cfg.strategies), run_dir / "curves.png",
                  f"countdown-mini: held-out accuracy vs fine-tuning {cfg.clock} time (start {start_acc:.2f})")
    write_json(run_dir / "result.json", result)
    return result
