"""countdown-mini, stage 1 and 2: the problems, the model and the supervised (SFT) start.

The held-out set and the training pool with brute-force solutions (`problem_sets`), the tiny
Qwen-style transformer (`model_config`), and `supervised_start`: Adam on the solutions until the
held-out accuracy reaches `sft_target` or `sft_max_steps`, saved to <run_dir>/sft and reused by
later runs with the same SFT settings (SFT_FIELDS; `sft_dir` moves it, e.g. one for a whole
search). With `trace` the answers are the solver's worked traces (`countdown_trace`, a larger
alphabet). `measure`: the end-of-fine-tune forgetting and coverage numbers. `cfg` is a
`countdown_mini.Config`; the recipe itself (the fine-tunes, their outputs, `run`) is
eggroll.recipes.countdown_mini.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
import optax

from .. import distributed
from ..baselines import grpo as grpo_mod
from ..models import transformer as tfm
from ..tasks import forgetting
from ..tasks.finetune import evaluate_accuracy
from ..tasks.char_tokenizer import DEFAULT_ALPHABET, CharTokenizer
from ..tasks.reasoning import CountdownSpec, countdown_task, countdown_trace, solve_countdown, trace_answer

if TYPE_CHECKING:
    from .countdown_mini import Config

SPEC = CountdownSpec(min_numbers=3, max_numbers=3, min_value=1, max_value=10, min_target=1, max_target=100)
TEMPLATE = "{numbers_str}>{target}:"
PROMPT_LEN = 13  # "10 10 10>100:"
SFT_FIELDS = ("hidden", "layers", "sft_seed", "sft_problems", "sft_batch", "sft_lr", "sft_target",
              "sft_max_steps", "eval_problems", "trace")
TRACE_ALPHABET = DEFAULT_ALPHABET + "abcdefghijklmnopqrstuvwxyz;"
TRACE_TOKENS = 112  # max_new_tokens for traced answers (the longest of 8,000 training problems: 94 + EOS)


def make_tokenizer(cfg: Config) -> CharTokenizer:
    return CharTokenizer(TRACE_ALPHABET if cfg.trace else DEFAULT_ALPHABET)


def solution(cfg: Config, ex) -> str:
    """The supervised answer: the solver's expression, or (--trace) its worked trace."""
    expr = solve_countdown(ex["numbers"], ex["target"]).replace(" ", "")
    return countdown_trace(ex["numbers"], ex["target"], expr) if cfg.trace else expr


def model_config(cfg: Config, vocab: int) -> tfm.TransformerConfig:
    heads = cfg.hidden // 16
    return tfm.TransformerConfig(vocab_size=vocab, hidden_size=cfg.hidden, num_layers=cfg.layers, num_heads=heads,
                                 num_kv_heads=max(1, heads // 2), head_dim=16, intermediate_size=3 * cfg.hidden,
                                 max_position=max(64, PROMPT_LEN + cfg.max_new_tokens), tie_embeddings=False)


def make_task(cfg: Config):
    return countdown_task(SPEC, template=TEMPLATE, source="builtin", partial=cfg.partial,
                          answer_fn=trace_answer if cfg.trace else (lambda text: text.strip() or None))


def _key(ex) -> tuple:
    return (tuple(ex["numbers"]), ex["target"])


SPLIT_VERSION = 2  # 2: the training pool also excludes the validation problems (an SFT checkpoint records it)


def problem_sets(cfg: Config, task):
    """(held-out test examples, training pool with solver solutions). The test set and the
    validation set (`validation_set`) are plain draws from the task's distribution (each from its
    own seeded stream, distinct, disjoint from each other); the pool excludes both."""
    held = task.sample(random.Random(10_000 + cfg.sft_seed), cfg.eval_problems)
    unseen = {_key(e) for e in held} | {_key(e) for e in validation_set(cfg, task, held)}
    rng, train, seen = random.Random(cfg.sft_seed), [], set()
    for _ in range(100 * cfg.sft_problems):
        if len(train) == cfg.sft_problems:
            break
        ex = task.sample(rng, 1)[0]
        k = _key(ex)
        if k in unseen or k in seen:
            continue
        seen.add(k)
        ex["solution"] = solution(cfg, ex)
        train.append(ex)
    if len(train) < cfg.sft_problems:
        raise ValueError(f"countdown-mini: only {len(train)} distinct training problems found; lower sft_problems")
    return held, train


def validation_set(cfg: Config, task, held) -> list:
    """`eval_problems` problems for choosing hyperparameters (a search scores its trials here, so
    the test set stays unseen until the winners are confirmed): drawn like the test set from their
    own seeded stream, distinct and not in it; the training pool excludes them (`problem_sets`)."""
    used, rng, out = {_key(e) for e in held}, random.Random(20_000 + cfg.sft_seed), []
    for _ in range(200 * cfg.eval_problems):
        if len(out) == cfg.eval_problems:
            return out
        ex = task.sample(rng, 1)[0]
        if _key(ex) not in used:
            used.add(_key(ex))
            out.append(ex)
    raise ValueError(f"countdown-mini: only {len(out)} validation problems outside the test set; lower eval_problems")


def log(cfg, msg):
    if cfg.progress:
        distributed.say(f"[countdown-mini] {msg}")


def supervised_start(cfg: Config, mcfg, tok, task, held, train) -> tuple:
    """Train (or reuse) the SFT checkpoint -> (params, start accuracy, metadata). Every process
    trains the same model; process 0 writes it."""
    ckpt = Path(cfg.sft_dir) if cfg.sft_dir else Path(cfg.run_dir) / "sft"
    sft_cfg = {**{k: getattr(cfg, k) for k in SFT_FIELDS}, "split": SPLIT_VERSION}
    template = tfm.init_params(jax.random.PRNGKey(cfg.sft_seed), mcfg)
    if distributed.checkpoint_exists(ckpt):
        params, meta = distributed.load_checkpoint(ckpt, template)
        if meta.get("sft_config") == sft_cfg:
            log(cfg, f"reusing SFT checkpoint {ckpt} (held-out accuracy {meta['accuracy']:.3f})")
            return params, meta["accuracy"], meta
        log(cfg, f"SFT settings changed: retraining {ckpt}")
    prompts, plens = tok.encode_batch([task.prompt(e) for e in train], length=PROMPT_LEN)
    comps, clens = tok.encode_batch([e["solution"] + "" for e in train], left_pad=False, length=cfg.max_new_tokens)
    comps[np.arange(len(train)), clens] = tok.eos_id  # solution then EOS (fits: max_new_tokens >= 12)
    clens = clens + 1
    data = grpo_mod.build_batch(prompts, plens, comps, clens, np.zeros(len(train)), None)
    fn = grpo_mod.transformer_logprob_fn(mcfg, last=cfg.max_new_tokens)  # the LM head at the answer positions only
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
        acc = held_out_accuracy(cfg, params, mcfg, tok, task, held)
        log(cfg, f"SFT step {steps}: loss {float(loss):.3f}, held-out accuracy {acc:.3f}")
        if acc >= cfg.sft_target:
            break
    meta = {"accuracy": acc, "steps": steps, "sft_s": round(time.perf_counter() - t0, 1), "sft_config": sft_cfg,
            "num_params": tfm.num_params(params)}
    distributed.save_checkpoint(ckpt, params, meta)
    return params, acc, meta


def heldout_nll(cfg, params, mcfg, tok, task, held) -> float:
    """Nats per token of the solver's solutions (+ EOS) of the held-out problems given their
    prompts: the base model's supervised distribution, the 'plain text' whose loss tells
    forgetting on countdown-mini."""
    texts = [task.prompt(e) + solution(cfg, e) for e in held]
    width = PROMPT_LEN + cfg.max_new_tokens
    ids, lens = tok.encode_batch(texts, length=width - 1)
    ids = np.concatenate([ids, np.full((len(ids), 1), tok.eos_id, np.int32)], axis=1)  # left padding stays valid
    context = np.asarray([len(task.prompt(e)) for e in held], np.int32)  # the prompt is context, not scored
    return forgetting.mean_token_nll(params, mcfg, ids, lens + 1, context=context)


def measure(cfg, setup, params) -> dict:
    """End-of-fine-tune measurements (result.json "measures"): Pass@1..Pass@K on the held-out
    problems (pass_k samples at pass_k_temperature), the held-out solution NLL before / after,
    and the drift ||theta - theta_0||."""
    s = setup
    out = {**forgetting.drift(params, s.params0),
           "heldout_nll": heldout_nll(cfg, params, s.mcfg, s.tok, s.task, s.held),
           "heldout_nll_start": heldout_nll(cfg, s.params0, s.mcfg, s.tok, s.task, s.held)}
    if cfg.pass_k:
        cov = forgetting.coverage(params, s.mcfg, s.tok, s.task, s.held, prompt_len=PROMPT_LEN,
                                  max_new_tokens=cfg.max_new_tokens, samples=cfg.pass_k,
                                  temperature=cfg.pass_k_temperature, key=jax.random.PRNGKey(cfg.seed))
        out.update({k: v for k, v in cov.items() if k.startswith("pass@")})
    return {"measures": out}


def held_out_accuracy(cfg, params, mcfg, tok, task, held) -> float:
    return evaluate_accuracy(params, mcfg, tok, task, held, prompt_len=PROMPT_LEN,
                             max_new_tokens=cfg.max_new_tokens)["accuracy"]
