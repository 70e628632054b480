"""Fine-tune a Hugging Face LLM on a reasoning task with EGGROLL or GRPO.

    eggroll train llm --model Qwen/Qwen2.5-0.5B-Instruct --task countdown --strategy eggroll
    eggroll train llm --model ./my-ckpt --task gsm8k --data-path gsm8k_train.jsonl --strategy grpo
    eggroll train llm --model ./my-ckpt --task countdown --resume      # continue runs/llm-... exactly

The model is any Qwen2 / Qwen2.5 / Qwen3 / Llama-3 checkpoint (directory or hub id) read by
`eggroll.models.hf.load_pretrained`; its `tokenizer.json` encodes prompts and decodes answers.
Prompts use the task's template (--template overrides it; fields {question} for GSM8K,
{numbers_csv} {target} for Countdown), wrapped in the checkpoint's chat template with --chat.

One step (a harness generation: `--generations` is the number of steps) = one EGGROLL
generation (population x prompts greedy answers, group z-score fitness, ES update) or one GRPO
update (prompts x group samples). Both share `eggroll.tasks.finetune`. Every `eval_every` steps
the unperturbed model answers the validation problems greedily (`val_accuracy`). Logged per
step with the diagnostics (no-signal fraction, truncation rate, distinct answers, mean reward;
`prompts_truncated`: training prompts cut to --max-prompt-tokens so far); a warning is printed
when the no-signal fraction stays high.

The run directory (runs/llm-<task>-<strategy>: config.json, metrics.jsonl, curve.png,
result.json, checkpoint/) and --resume are the run harness's (`eggroll.harness`): the checkpoint
holds params, optimizer state and ES state (or the GRPO key); the noise context is rebuilt from
the seed, never saved; the prompts of step t are a pure function of (seed, t); so --resume
continues bit for bit, and a config that differs in a training field is refused. With --export
the final weights are written as a Hugging Face checkpoint (run_dir/hf) loadable by transformers.

Several processes (`--coordinator HOST:PORT --num-processes P --process-id I`; docs/LLM.md):
EGGROLL splits the population over every device of every process; each process generates and
scores its own members' rows and only the rewards (with stops and answer ids: 12 bytes per
(member, prompt) row) are all-gathered, then every process applies the same update -- the
parameters are bitwise those of one process. GRPO is data parallel: each process samples its
share of the prompts, gradients are all-reduced every optimizer step. Validation problems are
split over the processes. `result.json["communication"]` has the bytes per step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from .. import distributed, harness
from ..baselines.grpo import check_data_parallel, grpo_finetuner
from ..config import OPTIMIZERS, flag
from ..tasks.diagnostics import NoSignalMonitor
from ..tasks import forgetting
from ..tasks.finetune import COMPUTE_DTYPES as DTYPES, es_finetuner, evaluate_accuracy
from ..tasks.param_groups import group_kinds, group_mask, llm_kinds, masked_optimizer, parse_groups
from ..tasks.reasoning import CountdownSpec, countdown_task, gsm8k_examples, gsm8k_task

TRAJECTORY_FIELDS = ("model", "task", "strategy", "seed", "population", "prompts", "sigma", "rank", "lr",
                     "optimizer", "group_size", "temperature", "clip_eps", "kl_coef", "minibatches",
                     "max_new_tokens", "max_prompt_tokens", "template", "chat", "perturb_embeddings",
                     "perturb_head", "countdown_numbers", "data_path", "train_params", "compute_dtype", "anchor_decay")

LLM_OPTIMIZERS = ("adam", "sgd")  # of config.OPTIMIZERS

_arg = flag  # Config field -> CLI flag (eggroll.config.flag)


@dataclass
class Config(harness.RunConfig):  # generations (= steps), eval_every, seed, run_dir, resume, time_limit, ...
    model: str = _arg("", "Hugging Face checkpoint directory or hub id (required)")
    task: str = _arg("countdown", "reasoning task", ("countdown", "gsm8k"))
    strategy: str = _arg("eggroll", "fine-tuning algorithm", ("eggroll", "grpo"))
    prompts: int = _arg(8, "prompts per step")
    max_new_tokens: int = _arg(256, "generated tokens per answer")
    max_prompt_tokens: int = _arg(256, "prompt width in tokens (longer prompts keep their last tokens)")
    template: str = _arg("", "prompt template (empty: the task's default)")
    chat: bool = _arg(False, "wrap prompts in the checkpoint's chat template")
    # EGGROLL
    population: int = _arg(64, "EGGROLL population (even, a multiple of the device count); every member answers every prompt")
    sigma: float = _arg(1e-3, "EGGROLL noise scale")
    rank: int = _arg(1, "EGGROLL perturbation rank")
    perturb_embeddings: bool = _arg(False, "EGGROLL: low-rank noise on the embedding table")
    perturb_head: bool = _arg(False, "EGGROLL: low-rank noise on the LM head (tied embeddings: the embedding table, "
                              "which is the head)")
    anchor_decay: float = _arg(0.0, "EGGROLL: each generation theta <- theta - decay * (theta - theta_0) (0: off)")
    max_rows: int = _arg(0, "each process generates at most this many rows at once (0: all its rows)")
    # GRPO
    group_size: int = _arg(8, "GRPO samples per prompt")
    temperature: float = _arg(1.0, "GRPO sampling temperature")
    clip_eps: float = _arg(0.2, "GRPO clip range")
    kl_coef: float = _arg(0.0, "GRPO KL coefficient (reference: the starting checkpoint)")
    minibatches: int = _arg(1, "GRPO minibatches per update")
    # shared
    train_params: str = _arg("", "parameter groups BOTH methods train: all, or a comma list of matrices, embeddings, "
                             "head, vectors (empty: EGGROLL per --perturb-*, GRPO all)")
    compute_dtype: str = _arg("float32", "dtype of generation and of GRPO's forward (masters stay float32)",
                              ("float32", "bfloat16"))
    heldout_text: str = _arg("", "plain-text file (one document per line): its loss before / after fine-tuning")
    heldout_lines: int = _arg(256, "lines of --heldout-text scored (each cut to --max-prompt-tokens tokens)")
    pass_k: int = _arg(0, "at the end: samples per validation problem for Pass@1..Pass@K (0: skip)")
    pass_k_temperature: float = _arg(1.0, "sampling temperature of the Pass@K samples")
    lr: float = _arg(1e-4, "learning rate")
    optimizer: str = _arg("adam", "optax optimizer", LLM_OPTIMIZERS)
    countdown_numbers: str = _arg("3,4", "countdown: min,max numbers per problem")
    data_path: str = _arg("", "gsm8k: local JSONL (question, answer) or HF dataset id; empty: openai/gsm8k")
    eval_problems: int = _arg(64, "validation problems")
    export: bool = _arg(False, "write the final weights as a Hugging Face checkpoint to run_dir/hf")
    no_signal_warn: float = _arg(0.9, "warn when this fraction of prompts gives no signal for 10 steps")
    # the run fields' defaults for this recipe
    generations: int = _arg(100, "training steps (EGGROLL generations / GRPO updates)")
    eval_every: int = _arg(10, "validate every k steps")
    checkpoint_every: int = _arg(10, "checkpoint every k steps (0: only at the end)")
    run_dir: str = _arg("", "run directory; empty: runs/llm-<task>-<strategy>")


def validate(cfg: Config) -> Config:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"llm config: {msg}")

    need(bool(cfg.model), "--model is required (a checkpoint directory or hub id)")
    need(cfg.task in ("countdown", "gsm8k"), f"task must be countdown or gsm8k, got {cfg.task!r}")
    need(cfg.strategy in ("eggroll", "grpo"), f"strategy must be eggroll or grpo, got {cfg.strategy!r}")
    need(cfg.population >= 2 and cfg.population % 2 == 0, f"population must be even >= 2, got {cfg.population}")
    need(cfg.group_size >= 2, f"group_size must be >= 2, got {cfg.group_size}")
    need(cfg.prompts >= 1 and cfg.eval_problems >= 1, "prompts and eval_problems must be >= 1")
    need(cfg.max_new_tokens >= 1 and cfg.max_prompt_tokens >= 1, "max_new_tokens and max_prompt_tokens must be >= 1")
    need(cfg.sigma > 0 and cfg.lr > 0 and cfg.temperature > 0, "sigma, lr and temperature must be > 0")
    need(cfg.optimizer in LLM_OPTIMIZERS, f"optimizer must be adam or sgd, got {cfg.optimizer!r}")
    need(cfg.minibatches >= 1 and cfg.max_rows >= 0, "minibatches must be >= 1 and max_rows >= 0")
    need(0 <= cfg.anchor_decay < 1, f"anchor_decay must be in [0, 1), got {cfg.anchor_decay}")
    need(cfg.compute_dtype in DTYPES, f"compute_dtype must be float32 or bfloat16, got {cfg.compute_dtype!r}")
    need(cfg.pass_k >= 0 and cfg.pass_k_temperature > 0 and cfg.heldout_lines >= 1,
         "pass_k must be >= 0, pass_k_temperature > 0, heldout_lines >= 1")
    if cfg.train_params:
        parse_groups(cfg.train_params)
    _ = countdown_sizes(cfg)
    harness.check_run_config(cfg)
    if cfg.strategy == "eggroll":
        harness.check_population(cfg.population)  # every device of every process
    else:
        check_data_parallel(cfg.prompts, cfg.group_size, cfg.minibatches)
    return cfg


def countdown_sizes(cfg: Config) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in cfg.countdown_numbers.split(","))
    except ValueError:
        raise ValueError(f"countdown_numbers must be 'min,max', got {cfg.countdown_numbers!r}") from None
    return lo, hi


class HFTokenizer:
    """Adapter: tokenizers.Tokenizer -> the interface of eggroll.tasks.finetune.

    BOS per model family (`hf.special_tokens`): with add_bos every row starts with one bos_id
    (Llama-3: <|begin_of_text|>), whether the text is plain or a rendered chat template that
    already begins with it (never twice); Qwen has no BOS. Texts are encoded without the
    tokenizer's post-processor (add_special_tokens=False), so nothing else is added."""

    def __init__(self, tok, eos_ids, chat_template=None, *, bos_id=None, add_bos: bool = False):
        if tok is None:
            raise FileNotFoundError("the checkpoint has no tokenizer.json; the llm recipe needs one")
        if not eos_ids:
            raise ValueError("the checkpoint names no EOS token (config / generation_config / tokenizer_config)")
        if add_bos and bos_id is None:
            raise ValueError("add_bos needs the checkpoint's bos_id (tokenizer_config bos_token)")
        self.tok, self.eos_ids, self.chat_template = tok, tuple(eos_ids), chat_template
        self.bos = [int(bos_id)] if add_bos else []
        self.pad_id = int(self.eos_ids[0])
        self.truncated = 0

    def encode_batch(self, texts, *, length: int, left_pad: bool = True):
        ids = np.full((len(texts), length), self.pad_id, np.int32)
        lengths = np.zeros(len(texts), np.int32)
        for i, enc in enumerate(self.tok.encode_batch(list(texts), add_special_tokens=False)):
            body = enc.ids[1:] if self.bos and enc.ids[:1] == self.bos else enc.ids
            row = self.bos + body[-(length - len(self.bos)):] if length > len(self.bos) else self.bos[:length]
            self.truncated += len(self.bos) + len(body) > length
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


def make_task(cfg: Config, chat_template, special: dict | None = None):
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

        base, marks = task.prompt, {k: (special or {}).get(k, "") for k in ("bos_token", "eos_token")}
        task.prompt = lambda ex: apply_chat_template(chat_template, [{"role": "user", "content": base(ex)}], **marks)
    return task, val


def step_examples(task, cfg: Config, step: int) -> list:
    """The prompts of step `step`: a pure function of (seed, step), so resume is exact."""
    return task.sample(random.Random(cfg.seed * 1_000_003 + step), cfg.prompts)


def make_finetuner(cfg: Config, mcfg, tok, task, params):
    """The fine-tuner of cfg.strategy on the parameter groups of --train-params (both methods
    the same set), or each method's default (EGGROLL: matrices + --perturb-embeddings /
    --perturb-head; tied: the head is the embedding table; GRPO: everything)."""
    opt = OPTIMIZERS[cfg.optimizer](cfg.lr)
    groups = parse_groups(cfg.train_params) if cfg.train_params else None
    dtype = DTYPES[cfg.compute_dtype]
    if cfg.strategy == "eggroll":
        kinds = (group_kinds(params, groups) if groups else
                 llm_kinds(embeddings=cfg.perturb_embeddings, head=cfg.perturb_head, tied=mcfg.tie_embeddings))
        return es_finetuner(mcfg, tok, task, opt, population=cfg.population, sigma=cfg.sigma, rank=cfg.rank,
                            kinds=kinds, prompt_len=cfg.max_prompt_tokens, max_new_tokens=cfg.max_new_tokens,
                            max_rows=cfg.max_rows or None, compute_dtype=dtype, anchor_decay=cfg.anchor_decay)
    return grpo_finetuner(mcfg, tok, task, masked_optimizer(opt, group_mask(params, groups)) if groups else opt,
                          group_size=cfg.group_size, prompt_len=cfg.max_prompt_tokens,
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, clip_eps=cfg.clip_eps,
                          kl_coef=cfg.kl_coef, ref_params=params if cfg.kl_coef else None,
                          minibatches=cfg.minibatches, compute_dtype=dtype, max_rows=cfg.max_rows or None)


def measure(cfg: Config, pre, tok, task, val, params) -> dict:
    """End-of-run measurements (result.json "measures"): drift ||theta - theta_0||, the loss of
    --heldout-text before / after, Pass@1..Pass@K on the validation problems (--pass-k)."""
    out = forgetting.drift(params, pre.params)
    if cfg.heldout_text:
        lines = [ln for ln in Path(cfg.heldout_text).read_text().splitlines() if ln.strip()][:cfg.heldout_lines]
        ids, lens = tok.encode_batch(lines, length=cfg.max_prompt_tokens)
        out["heldout_nll"] = forgetting.mean_token_nll(params, pre.cfg, ids, lens)
        out["heldout_nll_start"] = forgetting.mean_token_nll(pre.params, pre.cfg, ids, lens)
    if cfg.pass_k:
        cov = forgetting.coverage(params, pre.cfg, tok, task, val, prompt_len=cfg.max_prompt_tokens,
                                  max_new_tokens=cfg.max_new_tokens, samples=cfg.pass_k,
                                  temperature=cfg.pass_k_temperature, key=jax.random.PRNGKey(cfg.seed), batch=64)
        out.update({k: v for k, v in cov.items() if k.startswith("pass@")})
    return {"measures": out}


def make_train(cfg: Config) -> harness.Train:
    """The model, task and fine-tuner for the harness: one step per generation, greedy
    validation accuracy as the evaluation."""
    validate(cfg)
    from ..models.hf import load_pretrained

    pre = load_pretrained(cfg.model)
    if cfg.heldout_text and not Path(cfg.heldout_text).is_file():
        raise FileNotFoundError(f"--heldout-text {cfg.heldout_text!r} is not a file")
    tok = HFTokenizer(pre.tokenizer, pre.eos_ids, pre.chat_template, bos_id=pre.special.get("bos_id"),
                      add_bos=pre.special.get("add_bos", False))
    task, val = make_task(cfg, pre.chat_template, pre.special)
    ft = make_finetuner(cfg, pre.cfg, tok, task, pre.params)
    key = jax.random.PRNGKey(cfg.seed)
    if cfg.strategy == "eggroll":
        ctx = ft.setup(key, pre.params)  # the noise context: built once, passed to every step, never saved
        init, advance = (lambda: ft.init(ctx, pre.params)), (lambda s, ex: ft.step(ctx, s, ex))
        communication = lambda state: ft.communication(cfg.prompts)  # noqa: E731
    else:
        init, advance = (lambda: ft.init(key, pre.params)), ft.step
        communication = lambda state: ft.communication(state, cfg.prompts)  # noqa: E731
    monitor = NoSignalMonitor(threshold=cfg.no_signal_warn, window=10) if cfg.no_signal_warn > 0 else None

    def step(state, gen):
        before = tok.truncated
        state, m = advance(state, step_examples(task, cfg, gen))
        if monitor is not None and (msg := monitor.update(m["no_signal_frac"])):
            distributed.say(f"[llm] warning: {msg}")
        return state, {**m, "prompts_truncated": tok.truncated - before}

    def evaluate(state, gen):
        v = evaluate_accuracy(state.params, pre.cfg, tok, task, val, prompt_len=cfg.max_prompt_tokens,
                              max_new_tokens=cfg.max_new_tokens, batch=min(64, len(val)))
        return {"val_accuracy": v["accuracy"], "val_truncation_rate": v["truncation_rate"]}

    name = f"llm-{cfg.task}-{cfg.strategy}"

    def summary(state, result):
        if cfg.export and distributed.is_main_process():
            from ..models.hf import save_pretrained

            save_pretrained(str(Path(cfg.run_dir or f"runs/{name}") / "hf"), jax.device_get(state.params), pre.cfg,
                            source=pre.path)
        return {"val_accuracy": result["val_accuracy"], "steps": result["generations"], "task": cfg.task,
                "strategy": cfg.strategy, "model": cfg.model, **measure(cfg, pre, tok, task, val, state.params)}

    return harness.Train(
        name=name, init=init, step=step, evaluate=evaluate, trajectory=TRAJECTORY_FIELDS,
        title=f"{cfg.model}: {cfg.task}, {cfg.strategy}",
        plot_keys=[("val_accuracy", "mean_reward"), ("no_signal_frac",)],
        postfix_keys=["val_accuracy", "mean_reward", "no_signal_frac"], totals=("prompts_truncated",),
        summary=summary, communication=communication)


def run(cfg: Config) -> dict:
    """Fine-tune with the harness (logging, checkpoints, --resume); returns the result dict."""
    return harness.run(cfg, make_train)
