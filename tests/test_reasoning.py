"""Reasoning tasks: Countdown generator / solver / scorer, GSM8K extraction, custom rewards,
the character tokenizer and per-generation diagnostics."""

import itertools
import json
import random
from fractions import Fraction

import numpy as np
import pytest

from eggroll.tasks import reasoning as rs
from eggroll.tasks.char_tokenizer import CharTokenizer
from eggroll.tasks.diagnostics import NoSignalMonitor, generation_diagnostics

# ---- Countdown -----------------------------------------------------------------------

def test_evaluate_expression_exact_and_literals():
    assert rs.evaluate_expression("(12 - 5) * 3 + 7") == (Fraction(28), [12, 5, 3, 7])
    assert rs.evaluate_expression("7 / 2 * 2") == (Fraction(7), [7, 2, 2])  # exact, no float error
    assert rs.evaluate_expression("-3 + 5")[0] == 2
    for bad in ("__import__('os')", "2 ** 10", "3 % 2", "1e3", "abs(-1)", "2 +", ""):
        with pytest.raises((ValueError, SyntaxError)):
            rs.evaluate_expression(bad)
    with pytest.raises(ZeroDivisionError):
        rs.evaluate_expression("1 / (2 - 2)")


def test_score_countdown_rules():
    nums, target = [3, 5, 7], 22
    assert rs.score_countdown("3 * 5 + 7", nums, target) == 1.0
    assert rs.score_countdown("7 + 5 * 3", nums, target) == 1.0
    assert rs.score_countdown("3 * 5 + 7 + 0", nums, target) == 0.0  # extra number
    assert rs.score_countdown("3 * 7 + 1", nums, target) == 0.0  # wrong numbers
    assert rs.score_countdown("3 * 5 - 7", nums, target) == 0.0  # wrong value
    assert rs.score_countdown("3 * 5 - 7", nums, target, partial=0.05) == 0.05
    assert rs.score_countdown("5 * 3", nums, 15, use_all=False) == 1.0
    assert rs.score_countdown("5 * 3", nums, 15, use_all=True) == 0.0
    assert rs.score_countdown("5 * 5", nums, 25, use_all=False) == 0.0  # 5 used twice
    assert rs.score_countdown("(7 - 5) / (3 - 3)", [7, 5, 3, 3], 1) == 0.0  # division by zero
    assert rs.score_countdown(None, nums, target) == 0.0


def test_countdown_answer_extraction():
    assert rs.countdown_answer("think... <answer>3 * 5 + 7</answer>") == "3 * 5 + 7"
    assert rs.countdown_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert rs.countdown_answer("first line\n3 * 5 + 7 = 22\n") == "3 * 5 + 7"
    assert rs.countdown_answer("   \n") is None


def _brute_force_exists(numbers, target):
    """Independent reference: every value reachable by combining all numbers (exact)."""
    def values(items):
        if len(items) == 1:
            return {items[0]}
        out = set()
        n = len(items)
        for mask in range(1, 2 ** n - 1):
            left = tuple(items[i] for i in range(n) if mask >> i & 1)
            right = tuple(items[i] for i in range(n) if not mask >> i & 1)
            for a in values(left):
                for b in values(right):
                    out |= {a + b, a - b, a * b}
                    if b != 0:
                        out.add(a / b)
        return out
    return Fraction(target) in values(tuple(Fraction(x) for x in numbers))


def test_solver_matches_reference_and_scorer():
    rng = random.Random(0)
    for _ in range(60):
        nums = [rng.randint(1, 12) for _ in range(rng.randint(2, 4))]
        target = rng.randint(1, 60)
        sol = rs.solve_countdown(nums, target)
        assert (sol is not None) == _brute_force_exists(nums, target), (nums, target, sol)
        if sol is not None:
            assert rs.score_countdown(sol, nums, target) == 1.0, (nums, target, sol)


def test_builtin_generator_is_solvable_and_in_range():
    spec = rs.CountdownSpec(min_numbers=3, max_numbers=4, min_value=1, max_value=20, min_target=10, max_target=200)
    task = rs.countdown_task(spec, source="builtin")
    exs = task.sample(random.Random(1), 30)
    assert exs == rs.countdown_task(spec, source="builtin").sample(random.Random(1), 30)  # seeded
    for ex in exs:
        assert 3 <= len(ex["numbers"]) <= 4 and all(1 <= n <= 20 for n in ex["numbers"])
        assert 10 <= ex["target"] <= 200
        assert rs.score_countdown(ex["solution"], ex["numbers"], ex["target"]) == 1.0
        assert task.reward(f"<answer>{ex['solution']}</answer>", ex) == 1.0
        assert str(ex["target"]) in task.prompt(ex) and ex["numbers_csv"] in task.prompt(ex)


def test_reasoning_gym_generator_scored_by_our_rules():
    pytest.importorskip("reasoning_gym")
    task = rs.countdown_task(rs.CountdownSpec(min_numbers=3, max_numbers=4), source="reasoning_gym")
    for ex in task.sample(random.Random(0), 5):
        assert task.reward(f"<answer>{ex['solution']}</answer>", ex) == 1.0
        assert task.reward("<answer>1 + 1</answer>", ex) == 0.0


def test_malformed_completions_score_zero_never_raise():
    task = rs.countdown_task(rs.CountdownSpec(3, 3, 1, 9, 1, 50), source="builtin")
    ex = rs.countdown_example([3, 5, 7], 22)
    junk = ["", "<answer></answer>", "<answer>", "(((((", ")" * 400, "9" * 5000, "\x00\xff",
            "<answer>3 * 5 + </answer>", "<answer>import os</answer>", "x" * 100_000,
            "<answer>" + "(" * 300 + "1" + ")" * 300 + "</answer>", None, 12]
    scores = task.score_batch(junk, [ex] * len(junk))
    assert scores.dtype == np.float32 and np.all(scores == 0.0)


def test_custom_reward_errors_and_nonfinite_become_zero():
    def reward(text, ex):
        if text == "boom":
            raise RuntimeError("bad")
        return float("nan") if text == "nan" else len(text) / 10

    task = rs.custom_task(reward, [{"question": "q"}])
    np.testing.assert_allclose(task.score_batch(["boom", "nan", "abc"], [{}] * 3), [0.0, 0.0, 0.3], rtol=1e-6)
    with pytest.raises(ValueError, match="field"):
        rs.custom_task(reward, template="{missing}").prompt({"question": "q"})
    with pytest.raises(TypeError):
        rs.custom_task("not callable")


# ---- GSM8K ---------------------------------------------------------------------------

def test_gsm8k_extraction_and_matching(tmp_path):
    assert rs.gsm8k_reference("so 3+4=7\n#### 1,234") == "1234"
    assert rs.extract_final_answer("blah \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert rs.extract_final_answer("steps\n#### 42") == "42"
    assert rs.extract_final_answer("So the answer is $18.") == "18"
    assert rs.extract_final_answer("I have 3 apples and 5 pears, 8 in total") == "8"
    assert rs.extract_final_answer("no digits") is None
    assert rs.parse_number("$1,234.50") == 1234.5 and rs.parse_number("3/4") == 0.75
    assert rs.math_match("1,234", "1234", use_math_verify=False)
    assert not rs.math_match("1235", "1234", use_math_verify=False)
    assert not rs.math_match(None, "1234", use_math_verify=False)

    rows = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
            {"question": "Half of 10?", "answer": "10/2=5\n#### 5"}]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    exs = rs.gsm8k_examples(path=str(path))
    assert [e["reference"] for e in exs] == ["7", "5"]
    for mv in (False, True) if rs.have_math_verify() else (False,):
        task = rs.gsm8k_task(exs, use_math_verify=mv)
        got = task.score_batch(["3 + 4 = 7\n#### 7", "The answer is 6.", "", "\\boxed{5}"],
                               [exs[0], exs[0], exs[0], exs[1]])
        np.testing.assert_array_equal(got, [1.0, 0.0, 0.0, 1.0])
    assert "Tom has 3 apples" in rs.gsm8k_task(exs).prompt(exs[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x"}))
    with pytest.raises(ValueError, match="question"):
        rs.gsm8k_examples(path=str(bad))


# ---- tokenizer -----------------------------------------------------------------------

def test_char_tokenizer_round_trip_and_errors():
    tok = CharTokenizer()
    text = "3 5 7>22:(3*5)+7"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.eos_id, *tok.encode("99")]) == text  # stops at EOS
    assert tok.decode([tok.pad_id, *ids]) == text  # padding skipped
    assert len(set(tok.encode("0123456789"))) == 10
    with pytest.raises(ValueError, match="character"):
        tok.encode("3 & 5")
    batch, lengths = tok.encode_batch(["1 2>3:", "10 20 30>60:"], left_pad=True)
    assert batch.shape == (2, 12) and list(lengths) == [6, 12]
    assert list(batch[0, :6]) == [tok.pad_id] * 6 and tok.decode(batch[0]) == "1 2>3:"


# ---- diagnostics ---------------------------------------------------------------------

def test_generation_diagnostics_hand_values():
    # 4 members x 3 prompts; prompt 0 all equal (no signal), prompts 1, 2 vary
    scores = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1], [1, 0, 0]], np.float32)
    answers = [["a", "b", "c"], ["a", "x", "c"], ["a", "b", "y"], ["a", None, "c"]]
    finished = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [0, 1, 1]], bool)
    d = generation_diagnostics(scores, answers=answers, finished=finished)
    assert d["no_signal_frac"] == pytest.approx(1 / 3)
    assert d["truncation_rate"] == pytest.approx(2 / 12)
    assert d["mean_reward"] == pytest.approx(6 / 12)
    assert d["distinct_answers"] == pytest.approx((1 + 2 + 2) / 3)  # None is not an answer
    assert d["solve_rate"] == pytest.approx(6 / 12)
    assert generation_diagnostics(scores[:, 1:] * 0.5)["any_solved_frac"] == 0.0
    assert d["any_solved_frac"] == 1.0
    with pytest.raises(ValueError, match="members, prompts"):
        generation_diagnostics(np.zeros(3))


def test_no_signal_monitor_warns_once_when_high():
    mon = NoSignalMonitor(threshold=0.9, window=3)
    msgs = [mon.update(f) for f in (1.0, 1.0, 0.5, 1.0, 1.0, 0.95, 1.0)]
    assert [m is not None for m in msgs] == [False, False, False, False, False, True, False]
    assert "no learning signal" in msgs[5]


def test_solve_rate_matches_permutations_brute_force():
    """The solver agrees with a permutation-based enumerator on left-to-right expressions."""
    nums, target = [2, 3, 4], 20
    found = any(rs.score_countdown(f"({a} {o1} {b}) {o2} {c}", nums, target) == 1.0
                for a, b, c in itertools.permutations(nums) for o1 in "+-*/" for o2 in "+-*/")
    assert found and rs.solve_countdown(nums, target) is not None
