"""countdown-mini end to end (tiny settings) and the shared EGGROLL / GRPO fine-tuning harness."""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eggroll.models import transformer as tfm
from eggroll.recipes import countdown_mini as cm
from eggroll.recipes import countdown_sft
from eggroll.tasks.char_tokenizer import CharTokenizer
from eggroll.baselines.grpo import grpo_finetuner
from eggroll.tasks.finetune import es_finetuner, llm_kinds
from eggroll.tasks.reasoning import custom_task

TINY = tfm.TransformerConfig(vocab_size=CharTokenizer().vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=8, intermediate_size=32, max_position=64)


def _count_sevens(text, ex):
    return text.count("7") / 4


def test_es_step_frozen_vectors_and_fitness_shape():
    tok = CharTokenizer()
    task = custom_task(_count_sevens, [{"question": "1 2>3:"}, {"question": "4 5>9:"}, {"question": "9>9:"}])
    params = tfm.init_params(jax.random.PRNGKey(0), TINY, std=0.3)
    ft = es_finetuner(TINY, tok, task, optax.sgd(0.1), population=8, sigma=0.05, prompt_len=6, max_new_tokens=4,
                      kinds=llm_kinds(embeddings=False, head=True))
    ctx = ft.setup(jax.random.PRNGKey(1), params)  # the noise context: the caller's, never in the state
    st = ft.init(ctx, params)
    new, m = ft.step(ctx, st, task.examples)
    assert m["samples"] == 8 * 3 and 0 <= m["no_signal_frac"] <= 1 and np.isfinite(m["update_norm"])
    flat0 = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, x in jax.tree_util.tree_flatten_with_path(new.params)[0]:
        name = jax.tree_util.keystr(path)
        same = bool(jnp.array_equal(x, flat0[path]))
        if x.ndim == 1 or "embed_tokens" in name:
            assert same, f"{name} should be frozen"
    if m["no_signal_frac"] < 1:
        assert not jnp.array_equal(new.params["lm_head"]["weight"], params["lm_head"]["weight"])
    assert int(new.es_state.generation) == 1


@pytest.mark.slow
def test_es_step_chunked_generation_matches_whole():
    tok = CharTokenizer()
    task = custom_task(_count_sevens, [{"question": "1 2>3:"}, {"question": "4 5>9:"}, {"question": "9>9:"}])
    params = tfm.init_params(jax.random.PRNGKey(0), TINY, std=0.3)
    out = []
    for max_rows in (8, None):  # 24 rows in chunks of 8, or all at once
        ft = es_finetuner(TINY, tok, task, optax.sgd(0.1), population=8, sigma=0.05, prompt_len=6,
                          max_new_tokens=4, max_rows=max_rows)
        ctx = ft.setup(jax.random.PRNGKey(1), params)
        out.append(ft.step(ctx, ft.init(ctx, params), task.examples))
    assert out[0][1]["mean_reward"] == out[1][1]["mean_reward"]
    for a, b in zip(jax.tree_util.tree_leaves(out[0][0].params), jax.tree_util.tree_leaves(out[1][0].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_grpo_step_runs_on_harness():
    tok = CharTokenizer()
    task = custom_task(_count_sevens, [{"question": "1 2>3:"}, {"question": "4 5>9:"}])
    params = tfm.init_params(jax.random.PRNGKey(0), TINY, std=0.3)
    ft = grpo_finetuner(TINY, tok, task, optax.adam(1e-2), group_size=4, prompt_len=6, max_new_tokens=4,
                        kl_coef=0.1, ref_params=params)
    st = ft.init(jax.random.PRNGKey(2), params)
    _, m = ft.step(st, task.examples)
    assert m["samples"] == 8 and np.isfinite(m["loss"]) and "kl" in m
    with pytest.raises(ValueError, match="ref_params"):
        grpo_finetuner(TINY, tok, task, optax.sgd(1.0), group_size=2, prompt_len=6, max_new_tokens=4, kl_coef=0.1)


def test_problem_sets_disjoint_and_solved():
    cfg = cm.Config(sft_problems=200, eval_problems=50, progress=False)
    task = cm.make_task(cfg)
    held, train = cm.problem_sets(cfg, task)
    assert len(held) == 50 and len(train) == 200
    assert not {countdown_sft._key(e) for e in held} & {countdown_sft._key(e) for e in train}
    for ex in random.Random(0).sample(train, 20):
        assert task.reward(ex["solution"], ex) == 1.0
        assert len(task.prompt(ex)) <= cm.PROMPT_LEN and len(ex["solution"]) < cfg.max_new_tokens


TINY_RUN = dict(hidden=16, layers=1, sft_problems=200, sft_max_steps=20, sft_batch=16, eval_problems=16,
                population=4, es_prompts=2, grpo_prompts=2, group_size=2, progress=False)


def test_prompt_stream_replays_and_budget_clock():
    from eggroll.tasks.finetune import BudgetClock, PromptStream

    pool = list(range(100))
    rng = random.Random(5)
    sequential = [[pool[rng.randrange(100)] for _ in range(3)] for _ in range(6)]  # the old draw, step after step
    stream = PromptStream(pool, 5, 3)
    assert [stream.at(t) for t in range(6)] == sequential
    assert PromptStream(pool, 5, 3).at(4) == sequential[4]  # a resume at step 4
    clock = BudgetClock("wall", 1.0)
    out, spent = clock.timed(lambda x: x + 1, 1)
    assert out == 2 and spent["step_s"] >= 0 and spent["cpu_s"] >= 0 and clock.now == pytest.approx(spent["step_s"])
    assert clock.stop({"step_s": 0.4}) is False and clock.now == 0.4  # the harness's total wins
    clock.before = 0.2
    assert clock.crossed(0.3) and not clock.crossed(0.5) and clock.stop({"step_s": 1.0})


def test_countdown_mini_smoke(tmp_path):
    cfg = cm.Config(run_dir=str(tmp_path / "run"), budget_s=1.0, eval_every_s=0.5, **TINY_RUN)
    res = cm.run(cfg)
    for k in ("eggroll_accuracy", "grpo_accuracy", "start_accuracy", "budget_s"):
        assert res[k] is not None
    assert 0 <= res["eggroll_accuracy"] <= 1 and res["budget_s"] == 1.0
    recs = [json.loads(x) for x in (tmp_path / "run" / "curves.jsonl").read_text().splitlines()]
    assert {r["strategy"] for r in recs} == {"eggroll", "grpo"} and all(r["train_s"] <= 5 for r in recs)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert (tmp_path / "run" / "sft" / "arrays.safetensors").exists()
    sub = json.loads((tmp_path / "run" / "eggroll-seed0" / "result.json").read_text())  # one harness run each
    assert sub["stopped"] == "budget" and sub["cpu_s"] >= 1.0 and sub["strategy"] == "eggroll"
    # the end-of-run measurements of both methods: Pass@1..16, held-out NLL before / after, drift
    for s in ("eggroll", "grpo"):
        assert {"pass@1", "pass@16", "heldout_nll", "heldout_nll_start", "drift_norm"} <= set(res[f"{s}_measures"])
        assert res[f"{s}_measures"]["pass@1"]["mean"] <= res[f"{s}_measures"]["pass@16"]["mean"]
    assert (tmp_path / "run" / "grpo-seed0" / "checkpoint" / "arrays.safetensors").exists()
    eq = res["equal_wall"]  # both read at the shorter method's training wall seconds
    ends = {s: max(r["wall_s"] for r in recs if r["strategy"] == s) for s in ("eggroll", "grpo")}
    assert eq["wall_s"] == pytest.approx(min(ends.values()))
    short = min(ends, key=ends.get)
    assert eq[short]["mean"] == pytest.approx(res[f"{short}_accuracy"])  # the shorter one at its end
    # a second run reuses the SFT checkpoint and skips finished (strategy, seed) runs
    res2 = cm.run(cfg)
    assert res2["eggroll_accuracy"] == res["eggroll_accuracy"] and res2["start_accuracy"] == res["start_accuracy"]
    with pytest.raises(ValueError, match="population"):
        cm.validate(cm.Config(population=3))


@pytest.mark.slow
def test_countdown_mini_fine_tune_resumes_exactly(tmp_path):
    """A fine-tune stopped at step 2 and continued with --resume equals an uninterrupted 4-step one."""
    from safetensors.numpy import load_file

    def run(name, steps, **kw):
        return cm.run(cm.Config(run_dir=str(tmp_path / name), budget_s=1e9, eval_every_s=1e9, generations=steps,
                                checkpoint_every=1, **{**TINY_RUN, **kw}))

    full = run("full", 4)
    run("part", 2)
    part = run("part", 4, resume=True)
    assert part["eggroll_accuracy"] == full["eggroll_accuracy"] and part["grpo_accuracy"] == full["grpo_accuracy"]
    for s in ("eggroll", "grpo"):
        a = load_file(str(tmp_path / "full" / f"{s}-seed0" / "checkpoint" / "arrays.safetensors"))
        b = load_file(str(tmp_path / "part" / f"{s}-seed0" / "checkpoint" / "arrays.safetensors"))
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{s} {k}")
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "steps.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 1, 2, 3, 4]  # no step repeated or lost
    with pytest.raises(ValueError, match="cannot resume"):
        run("part", 6, resume=True, sigma=0.01)


def test_countdown_search_equal_budget_and_resumes(tmp_path):
    """A tiny search: one trial per method from one shared SFT checkpoint; rerun = nothing new."""
    from eggroll.recipes import countdown_search as cs

    base = {k: v for k, v in TINY_RUN.items() if k not in ("progress",)}
    space = {"eggroll": {"sigma": [0.01], "population": [4], "es_prompts": [2]},
             "grpo": {"group_size": [2], "grpo_prompts": [2], "grpo_temperature": [1.0]}}
    cfg = cs.Config(trials=1, budget_s=0.3, space=json.dumps(space), base=json.dumps({**base, "pass_k": 2}),
                    out_dir=str(tmp_path / "s"), confirm_seeds="5")
    res = cs.run(cfg)
    lines = [json.loads(x) for x in (tmp_path / "s" / "trials.jsonl").read_text().splitlines()]
    assert [(t["method"], t["trial"]) for t in lines] == [("eggroll", 0), ("grpo", 0)]
    assert res["best"]["eggroll"]["hp"]["sigma"] == 0.01 and res["best"]["grpo"]["trials"] == 1
    assert (tmp_path / "s" / "sft" / "arrays.safetensors").exists()  # one SFT start for every trial
    assert not (tmp_path / "s" / "grpo" / "trial0" / "sft").exists()
    again = cs.run(cfg)
    assert again["best"] == res["best"] and len((tmp_path / "s" / "trials.jsonl").read_text().splitlines()) == 2
    trial = json.loads((tmp_path / "s" / "eggroll" / "trial0" / "result.json").read_text())
    assert {"pass@1", "pass@2", "heldout_nll", "heldout_nll_start", "drift_norm"} <= set(trial["eggroll_measures"])
    assert trial["eval_set"] == "validation"  # trials never see the test set ...
    for m in ("eggroll", "grpo"):  # ... the winners' reruns on fresh seeds are scored on it
        confirmed = json.loads((tmp_path / "s" / m / "confirm" / "result.json").read_text())
        assert confirmed["eval_set"] == "test" and confirmed["seeds"] == [5]
        assert res["confirm"][m]["per_seed"] == confirmed[f"{m}_accuracy_per_seed"]
        assert "--eval-set test" in res["confirm"][m]["command"] and "--seeds 5" in res["confirm"][m]["command"]
    with pytest.raises(ValueError, match="not a tunable"):
        cs.spaces(cs.Config(space=json.dumps({"grpo": {"sigma": [0.1]}})))
    with pytest.raises(ValueError, match="--base"):
        cs.run(cs.Config(base=json.dumps({"nope": 1}), out_dir=str(tmp_path / "bad")))


def test_validation_set_is_disjoint_and_reproducible():
    cfg = cm.Config(sft_problems=300, eval_problems=40)
    task = cm.make_task(cfg)
    held, train = cm.problem_sets(cfg, task)
    val = countdown_sft.validation_set(cfg, task, held)
    key = lambda e: (tuple(e["numbers"]), e["target"])  # noqa: E731
    assert len(val) == 40 and len({key(e) for e in val}) == 40
    assert not {key(e) for e in val} & ({key(e) for e in held} | {key(e) for e in train})
    held2, train2 = cm.problem_sets(cfg, task)  # the same draws every time
    assert [key(e) for e in held2] == [key(e) for e in held] and [key(e) for e in train2] == [key(e) for e in train]
    assert [key(e) for e in countdown_sft.validation_set(cfg, task, held2)] == [key(e) for e in val]
    with pytest.raises(ValueError, match="eval_set"):
        cm.validate(cm.Config(eval_set="train"))


def test_reasoning_trace_answers():
    from eggroll.tasks.reasoning import countdown_trace, trace_answer

    t = countdown_trace([3, 5, 7], 22, "3 * 5 + 7")
    assert t == "3 * 5 = 15 ; left 7 15 ; 15 + 7 = 22 ; left 22 ; check 3*5+7 = 22 ; answer 3*5+7"
    assert trace_answer(t) == "3*5+7" and trace_answer("no final line") is None
    assert "4 / 6 = 2/3 ; left 3 2/3 ;" in countdown_trace([4, 6, 3], 2, "4/6*3")  # fractions as p/q
    with pytest.raises(ValueError, match="not 23"):
        countdown_trace([3, 5, 7], 23, "3*5+7")
    cfg = cm.Config(sft_problems=200, eval_problems=20, trace=True, max_new_tokens=countdown_sft.TRACE_TOKENS)
    task, tok = cm.make_task(cfg), countdown_sft.make_tokenizer(cfg)
    held, train = cm.problem_sets(cfg, task)
    lengths = [len(tok.encode(e["solution"])) for e in train]
    assert min(lengths) >= 64 and max(lengths) < cfg.max_new_tokens  # a trace of >= 64 tokens, + EOS fits
    assert all(task.reward(e["solution"], e) == 1.0 for e in train[:50])  # the reward reads the final answer
    with pytest.raises(ValueError, match="--trace needs --max-new-tokens"):
        cm.validate(cm.Config(trace=True))


@pytest.mark.slow
def test_countdown_mini_trace_smoke(tmp_path):
    cfg = cm.Config(run_dir=str(tmp_path / "run"), budget_s=0.5, eval_every_s=0.5, trace=True,
                    max_new_tokens=countdown_sft.TRACE_TOKENS, **{**TINY_RUN, "sft_max_steps": 5, "pass_k": 2})
    res = cm.run(cfg)
    assert 0 <= res["eggroll_accuracy"] <= 1 and 0 <= res["grpo_accuracy"] <= 1
    for s in ("eggroll", "grpo"):
        assert set(res[f"{s}_measures"]) >= {"pass@1", "pass@2", "heldout_nll", "drift_norm"}
