"""Fine-tune a Hugging Face LLM on a reasoning task with EGGROLL or GRPO.

    eggroll train llm --model Qwen/Qwen2.5-0.5B-Instruct --task countdown --strategy eggroll
    eggroll train llm --model ./my-ckpt --task gsm8k --data-path gsm8k_train.jsonl --strategy grpo
    eggroll train llm --model ./my-ckpt --task countdown --resume      # continue runs/llm-... exactly

The model is any Qwen2 / Qwen2.5 / Qwen3 / Llama-3 checkpoint (directory or hub id) read by
`eggroll.models.hf.load_pretrained`; its `tokenizer.json` encodes prompts and decodes answers.
Prompts use the task's template (--template overrides it; fields {question} for GSM8K,
{numbers_csv} {target} for Countdown), wrapped in the checkpoint's chat template with --chat.

One step = one EGGROLL generation (population x prompts greedy answers, group z-score
fitness, ES update) or one GRPO update (prompts x group samples). Both share
`eggroll.tasks.finetune`. Every `eval_every` steps the unperturbed model answers the
validation problems greedily (`val_accuracy`). Logged per step to metrics.jsonl (with
the diagnostics: no-signal fraction, truncation rate, distinct answers, mean reward) and a
progress bar; a warning is printed when the no-signal fraction stays high. checkpoint/ holds
the full training state (params, optimizer, ES state or GRPO key) and the step; the prompts of
step t are a pure function of (seed, t), so --resume continues bit for bit. With --export the
final weights are written as a Hugging Face checkpoint (run_dir/hf) loadable by transformers.
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

from ..checkpoint import load_checkpoint, save_checkpoint, config_mismatch
from ..runlog import RunLog
from ..tasks.diagnostics import NoSignalMonitor
from ..baselines.grpo import grpo_finetuner
from ..tasks.finetune import es_finetuner, evaluate_accuracy, llm_kinds
from ..tasks.reasoning import CountdownSpec, countdown_task, gsm8k_examples, gsm8k_task
from ..config import OPTIMIZERS, flag

TRAJECTORY_FIELDS = ("model", "task", "strategy", "seed", "population", "prompts", "sigma", "rank", "lr",
                     "optimizer", "group_size", "temperature", "clip_eps", "kl_coef", "minibatches",
                     "max_new_tokens", "max_prompt_tokens", "template", "chat", "perturb_embeddings",
                     "perturb_head", "countdown_numbers", "data_path")

LLM_OPTIMIZERS = ("adam", "sgd")  # of config.OPTIMIZERS

_arg = flag  # Config field -> CLI flag (eggroll.config.flag)


@dataclass
class Config:
    model: str = _arg("", "Hugging Face checkpoint directory or hub id (required)")
    task: str = _arg("countdown", "reasoning task", ("countdown", "gsm8k"))
    strategy: str = _arg("eggroll", "fine-tuning algorithm", ("eggroll", "grpo"))
    steps: int = _arg(100, "training steps (EGGROLL generations / GRPO updates)")
    prompts: int = _arg(8, "prompts per step")
    max_new_tokens: int = _arg(256, "generated tokens per answer")
    max_prompt_tokens: int = _arg(256, "prompt width in tokens (longer prompts keep their last tokens)")
    template: str = _arg("", "prompt template (empty: the task's default)")
    chat: bool = _arg(False, "wrap prompts in the checkpoint's chat template")
    # EGGROLL
    population: int = _arg(64, "EGGROLL population (even); every member answers every prompt")
    sigma: float = _arg(1e-3, "EGGROLL noise scale")
    rank: int = _arg(1, "EGGROLL perturbation rank")
    perturb_embeddings: bool = _arg(False, "EGGROLL: low-rank noise on the embedding table")
    perturb_head: bool = _arg(False, "EGGROLL: low-rank noise on the LM head")
    max_rows: int = _arg(0, "EGGROLL: generate at most this many rows at once (0: population x prompts)")
    # GRPO
    group_size: int = _arg(8, "GRPO samples per prompt")
    temperature: float = _arg(1.0, "GRPO sampling temperature")
    clip_eps: float = _arg(0.2, "GRPO clip range")
    kl_coef: float = _arg(0.0, "GRPO KL coefficient (reference: the starting checkpoint)")
    minibatches: int = _arg(1, "GRPO minibatches per update")
    # shared
    lr: float = _arg(1e-4, "learning rate")
    optimizer: str = _arg("adam", "optax optimizer", LLM_OPTIMIZERS)
    countdown_numbers: str = _arg("3,4", "countdown: min,max numbers per problem")
    data_path: str = _arg("", "gsm8k: local JSONL (question, answer) or HF dataset id; empty: openai/gsm8k")
    eval_every: int = _arg(10, "validate every k steps")
    eval_problems: int = _arg(64, "validation problems")
    checkpoint_every: int = _arg(10, "checkpoint every k steps (0: only at the end)")
    seed: int = _arg(0, "random seed")
    run_dir: str = _arg("", "run directory; empty: runs/llm-<task>-<strategy>")
    resume: bool = _arg(False, "continue from the run directory's checkpoint")
    export: bool = _arg(False, "write the final weights as a Hugging Face checkpoint to run_dir/hf")
    no_signal_warn: float = _arg(0.9, "warn when this fraction of prompts gives no signal for 10 steps")
    progress: bool = _arg(True, "progress bar on stderr")


def validate(cfg: Config) -> Config:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"llm config: {msg}")

    need(bool(cfg.model), "--model is required (a checkpoint directory or hub id)")
    need(cfg.task in ("countdown", "gsm8k"), f"task must be countdown or gsm8k, got {cfg.task!r}")
    need(cfg.strategy in ("eggroll", "grpo"), f"strategy must be eggroll or grpo, got {cfg.strategy!r}")
    need(cfg.population >= 2 and cfg.population % 2 == 0, f"population must be even >= 2, got {cfg.population}")
    need(cfg.group_size >= 2, f"group_size must be >= 2, got {cfg.group_size}")
    need(cfg.prompts >= 1 and cfg.steps >= 0 and cfg.eval_every >= 1 and cfg.eval_problems >= 1,
         "prompts, eval_every, eval_problems must be >= 1 and steps >= 0")
    need(cfg.max_new_tokens >= 1 and cfg.max_prompt_tokens >= 1, "max_new_tokens and max_prompt_tokens must be >= 1")
    need(cfg.sigma > 0 and cfg.lr > 0 and cfg.temperature > 0, "sigma, lr and temperature must be > 0")
    need(cfg.optimizer in LLM_OPTIMIZERS, f"optimizer must be adam or sgd, got {cfg.optimizer!r}")
    _ = countdown_sizes(cfg)
    return cfg


def countdown_sizes(cfg: Config) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in cfg.countdown_numbers.split(","))
    except ValueError:
        raise ValueError(f"countdown_numbers must be 'min,max', got {cfg.countdown_numbers!r}") from None
    return lo, hi


class HFTokenizer:
    """Adapter: tokenizers.Tokenizer -> the interface of eggroll.tasks.finetune."""

    def __init__(self, tok, eos_ids, chat_template=None):
        if tok is None:
            raise FileNotFoundError("the checkpoint has no tokenizer.json; the llm recipe needs one")
        if not eos_ids:
            raise ValueError("the checkpoint names no EOS token (config / generation_config / tokenizer_config)")
        self.tok, self.eos_ids, self.chat_template = tok, tuple(eos_ids), chat_template
        self.pad_id = int(self.eos_ids[0])
        self.truncated = 0

    def encode_batch(self, texts, *, length: int, left_pad: bool = True):
        ids = np.full((len(texts), length), self.pad_id, np.int32)
        lengths = np.zeros(len(texts), np.int32)
        for i, enc in enumerate(self.tok.encode_batch(list(texts), add_special_tokens=False)):
            row = enc.ids[-length:]
            self.truncated += len(enc.ids) > length
            lengths[i] = len(row)
            if row:
                ids[i, length - len(row):] = row
        return ids, lengths

    def decode(self, ids) -> str:
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i in self.eos_ids:
                break
            out.append(i)
        return self.tok.decode(out, skip_special_tokens=True)


def make_task(cfg: Config, chat_template):
    if cfg.task == "countdown":
        lo, hi = countdown_sizes(cfg)
        task = countdown_task(CountdownSpec(min_numbers=lo, max_numbers=hi), **({"template": cfg.template} if cfg.template else {}))
        val = task.sample(random.Random(10**9 + cfg.seed), cfg.eval_problems)
    else:
        train_ex = gsm8k_examples("train", path=cfg.data_path or None)
        task = gsm8k_task(train_ex, **({"template": cfg.template} if cfg.template else {}))
        val = gsm8k_examples("test", path=cfg.data_path or None, limit=cfg.eval_problems)
    if cfg.chat:
        from ..models.hf import apply_chat_template

        base = task.prompt
        task.prompt = lambda ex: apply_chat_template(chat_template, [{"role": "user", "content": base(ex)}])
    return task, val


def step_examples(task, cfg: Config, step: int) -> list:
    """The prompts of step `step`: a pure function of (seed, step), so resume is exact."""
    return task.sample(random.Random(cfg.seed * 1_000_003 + step), cfg.prompts)


def make_finetuner(cfg: Config, mcfg, tok, task, params):
    opt = OPTIMIZERS[cfg.optimizer](cfg.lr)
    if cfg.strategy == "eggroll":
        return es_finetuner(mcfg, tok, task, opt, population=cfg.population, sigma=cfg.sigma, rank=cfg.rank,
                            kinds=llm_kinds(embeddings=cfg.perturb_embeddings, head=cfg.perturb_head),
                            prompt_len=cfg.max_prompt_tokens, max_new_tokens=cfg.max_new_tokens,
                            max_rows=cfg.max_rows or None)
    return grpo_finetuner(mcfg, tok, task, opt, group_size=cfg.group_size, prompt_len=cfg.max_prompt_tokens,
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, clip_eps=cfg.clip_eps,
                          kl_coef=cfg.kl_coef, ref_params=params if cfg.kl_coef else None,
                          minibatches=cfg.minibatches)


def _resume_mismatch(cfg: Config, saved: dict) -> list[str]:
    return config_mismatch(cfg, saved, TRAJECTORY_FIELDS)


def run(cfg: Config) -> dict:
    validate(cfg)
    from ..models.hf import load_pretrained, save_pretrained

    t0 = time.perf_counter()
    run_dir = Path(cfg.run_dir or f"runs/llm-{cfg.task}-{cfg.strategy}")
    ckpt_dir = run_dir / "checkpoint"
    pre = load_pretrained(cfg.model)
    tok = HFTokenizer(pre.tokenizer, pre.eos_ids, pre.chat_template)
    task, val = make_task(cfg, pre.chat_template)
    ft = make_finetuner(cfg, pre.cfg, tok, task, pre.params)
    state = ft.init(jax.random.PRNGKey(cfg.seed), pre.params)

    meta: dict = {}
    if cfg.resume and (ckpt_dir / "arrays.safetensors").exists():
        saved = json.loads((ckpt_dir / "meta.json").read_text()).get("metadata", {})
        bad = _resume_mismatch(cfg, saved.get("config", {}))
        if bad:
            raise ValueError(f"cannot resume {ckpt_dir}: the config differs in fields that change training "
                             f"({'; '.join(bad)}); use the original values or a new run_dir")
        state, meta = load_checkpoint(ckpt_dir, state)
    elif cfg.resume:
        print(f"[llm] --resume: no checkpoint in {ckpt_dir}, starting from scratch", file=sys.stderr)
    start = int(meta.get("step", 0))

    log = RunLog(run_dir, total=cfg.steps, x="step", resume_from=start if meta else None,
                 wall_offset=meta.get("wall_s"), plot_keys=[("val_accuracy", "mean_reward"), ("no_signal_frac",)],
                 postfix_keys=["val_accuracy", "mean_reward", "no_signal_frac"],
                 progress=None if cfg.progress else False, desc=f"llm {cfg.task} {cfg.strategy}",
                 title=f"{cfg.model}: {cfg.task}, {cfg.strategy}", start_time=t0)
    log.write_json("config", dataclasses.asdict(cfg))
    monitor = NoSignalMonitor(threshold=cfg.no_signal_warn, window=10) if cfg.no_signal_warn > 0 else None

    def validation():
        return evaluate_accuracy(state.params, pre.cfg, tok, task, val, prompt_len=cfg.max_prompt_tokens,
                                 max_new_tokens=cfg.max_new_tokens, batch=min(64, len(val)))

    step, val_acc = start, meta.get("val_accuracy")
    if not meta:
        v = validation()
        val_acc = v["accuracy"]
        log.log(0, {"val_accuracy": val_acc, "val_truncation_rate": v["truncation_rate"]})
    try:
        while step < cfg.steps:
            state, m = ft.step(state, step_examples(task, cfg, step))
            step += 1
            if monitor is not None and (msg := monitor.update(m["no_signal_frac"])):
                print(f"[llm] warning: {msg}", file=sys.stderr)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                v = validation()
                val_acc = m["val_accuracy"] = v["accuracy"]
                m["val_truncation_rate"] = v["truncation_rate"]
            m["prompts_truncated"] = tok.truncated
            log.log(step, m)
            if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                save_checkpoint(ckpt_dir, state, {"step": step, "wall_s": log.elapsed, "val_accuracy": val_acc,
                                                  "config": dataclasses.asdict(cfg)})
        if cfg.export:
            save_pretrained(str(run_dir / "hf"), state.params, pre.cfg, source=pre.path)
        result = {"val_accuracy": val_acc, "steps": step, "task": cfg.task, "strategy": cfg.strategy,
                  "model": cfg.model, "wall_s": round(log.elapsed, 3), "run_dir": str(run_dir)}
        log.write_json("result", result)
        log.plot()
    finally:
        log.close()
    return result
