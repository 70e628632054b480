"""Reasoning tasks with verifiable rewards: Countdown, GSM8K, and any reward function on text.

A task turns examples into prompts and scores a decoded completion against its example:

    task = countdown_task()                      # or gsm8k_task(...), custom_task(...)
    examples = task.sample(rng, 8)               # list of dicts
    prompts = [task.prompt(ex) for ex in examples]
    rewards = task.score_batch(completions, examples)   # float32 (len,), never raises

Rewards are plain Python on strings; a completion that is malformed, empty, absurdly long or
makes the scorer raise scores 0.0 (`safe_reward`), so one bad generation never stops training.

Countdown. Given numbers and a target, write an arithmetic expression with + - * / and
parentheses that uses each given number exactly once (all of them, by default) and equals
the target. The rules and the generator follow reasoning-gym's `countdown` dataset: a random
expression over the drawn numbers fixes the target, so every problem is solvable. Problems
come from reasoning-gym itself when it is installed (`source="reasoning_gym"`), otherwise from
our own generator (`source="builtin"`) with the same rules; scoring is always ours (exact
rational arithmetic over a parsed AST, no eval). `solve_countdown` is a brute-force solver
(supervised data for countdown-mini, and tests); `countdown_trace` writes a solver answer out
as a worked trace (each operation, the numbers left, a check) and `trace_answer` reads its
final expression back.

GSM8K (tasks/gsm8k.py, re-exported here). Grade-school maths word problems; the reference answer follows "####".
`gsm8k_examples` loads them with Hugging Face `datasets` (or from a local JSONL file); the
completion's final answer is taken from \\boxed{...}, "####", "answer is ..." or its last
number, and checked with `math-verify` when installed, else numerically.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction


from .task import MAX_COMPLETION_CHARS, Example, RewardFn, Task, custom_task, extract_tagged, safe_reward  # noqa: F401
from .gsm8k import (  # noqa: F401  (GSM8K lives in tasks/gsm8k.py; re-exported here)
    GSM8K_TEMPLATE, extract_final_answer, gsm8k_examples, gsm8k_reference, gsm8k_task, have_math_verify, math_match,
    numeric_match, parse_number,
)

# ---------------------------------------------------------------------------------------
# Countdown
# ---------------------------------------------------------------------------------------

COUNTDOWN_TEMPLATE = (
    "Using the numbers {numbers_csv}, create an expression that equals {target}. "
    "Use each number exactly once and only + - * / and parentheses. "
    "Give the final expression inside <answer> </answer> tags, for example <answer>(1 + 2) * 3</answer>."
)
_OPS = ("+", "-", "*", "/")


@dataclass(frozen=True)
class CountdownSpec:
    """Problem sizes (reasoning-gym's countdown defaults: 4-6 numbers in 1..100, target 100..999)."""

    min_numbers: int = 4
    max_numbers: int = 6
    min_value: int = 1
    max_value: int = 100
    min_target: int = 100
    max_target: int = 999
    use_all: bool = True  # every number must be used (reasoning-gym's rule)

    def check(self) -> CountdownSpec:
        if not 2 <= self.min_numbers <= self.max_numbers:
            raise ValueError(f"countdown: need 2 <= min_numbers <= max_numbers, got {self.min_numbers}, {self.max_numbers}")
        if not 1 <= self.min_value <= self.max_value:
            raise ValueError(f"countdown: need 1 <= min_value <= max_value, got {self.min_value}, {self.max_value}")
        if not self.min_target <= self.max_target:
            raise ValueError(f"countdown: need min_target <= max_target, got {self.min_target}, {self.max_target}")
        return self


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b if b != 0 else None


def random_expression(rng: random.Random, numbers: Sequence[int]) -> tuple[str, Fraction]:
    """A random fully-parenthesised expression using every number once, and its exact value."""
    items = [(str(n), Fraction(n)) for n in numbers]
    rng.shuffle(items)
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (ea, va), (eb, vb) = items[i], items[j]
        op = rng.choice(_OPS)
        v = _apply(op, va, vb)
        if v is None:
            op, v = "+", va + vb
        items = [x for k, x in enumerate(items) if k not in (i, j)] + [(f"({ea} {op} {eb})", v)]
    return items[0]


def solve_countdown(numbers: Sequence[int], target: int, *, use_all: bool = True) -> str | None:
    """Brute force: an expression over `numbers` equal to `target` (None if there is none).

    Repeatedly combine two of the remaining values with + - * / (exact fractions), depth first,
    with memoisation on the multiset of remaining values. Returns a minimally-parenthesised
    expression string. Cost grows fast with len(numbers): fine up to 6."""
    target = Fraction(target)
    seen: set = set()

    def search(items):  # items: tuple of (value, expr, precedence)
        if use_all is False or len(items) == 1:
            for v, e, _ in items:
                if v == target:
                    return e
            if len(items) == 1:
                return None
        key = tuple(sorted(v for v, _, _ in items))
        if key in seen:
            return None
        seen.add(key)
        n = len(items)
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                (va, ea, pa), (vb, eb, pb) = items[i], items[j]
                rest = tuple(items[k] for k in range(n) if k not in (i, j))
                for op in _OPS:
                    if op in "+*" and i > j:
                        continue  # commutative: one order suffices
                    v = _apply(op, va, vb)
                    if v is None:
                        continue
                    prec = 1 if op in "+-" else 2
                    left = ea if pa >= prec else f"({ea})"
                    # right operand of - and / needs brackets at equal precedence
                    right = eb if pb > prec or (pb == prec and op in "+*") else f"({eb})"
                    found = search(rest + ((v, f"{left} {op} {right}", prec),))
                    if found is not None:
                        return found
        return None

    return search(tuple((Fraction(x), str(x), 3) for x in numbers))


def _fmt(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def countdown_trace(numbers: Sequence[int], target: int, expr: str) -> str:
    """A worked solution of `expr` (e.g. a `solve_countdown` answer): each operation in
    evaluation order with its value and the numbers left, a check, then "answer <expr>", e.g.
    "3 * 5 = 15 ; left 7 15 ; 15 + 7 = 22 ; left 22 ; check 3*5+7 = 22 ; answer 3*5+7". The
    reward still reads only the expression after the last "answer" (`trace_answer`)."""
    left, steps = [Fraction(n) for n in numbers], []
    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

    def ev(node) -> Fraction:
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        if not isinstance(node, ast.BinOp) or type(node.op) not in ops:
            raise ValueError(f"countdown_trace: {expr!r} is not a binary arithmetic expression over the numbers")
        a, b = ev(node.left), ev(node.right)
        op = ops[type(node.op)]
        v = _apply(op, a, b)
        if v is None:
            raise ValueError(f"countdown_trace: {expr!r} divides by zero")
        left.remove(a)
        left.remove(b)
        left.append(v)
        steps.append(f"{_fmt(a)} {op} {_fmt(b)} = {_fmt(v)} ; left {' '.join(_fmt(x) for x in left)} ;")
        return v

    compact = expr.replace(" ", "")
    value = ev(ast.parse(compact, mode="eval").body)
    if value != target:
        raise ValueError(f"countdown_trace: {expr!r} = {_fmt(value)}, not {target}")
    return " ".join(steps + [f"check {compact} = {_fmt(value)} ;", f"answer {compact}"])


def trace_answer(completion: str) -> str | None:
    """The expression after the last "answer" of a traced completion (None if there is none)."""
    if "answer" not in completion:
        return None
    return completion.rsplit("answer", 1)[1].strip() or None


_ALLOWED_CHARS = re.compile(r"^[\d+\-*/().\s]+$")


def evaluate_expression(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integer literals it uses, in order.

    Only non-negative integer literals, + - * / and parentheses (and unary minus) are accepted;
    anything else raises ValueError. Division by zero raises ZeroDivisionError."""
    if not _ALLOWED_CHARS.match(expr) or len(expr) > 500:
        raise ValueError(f"not a plain arithmetic expression: {expr[:80]!r}")
    tree = ast.parse(expr.strip(), mode="eval")
    used: list[int] = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            a, b = ev(node.left), ev(node.right)
            op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
            if op == "/" and b == 0:
                raise ZeroDivisionError("division by zero")
            return _apply(op, a, b)
        raise ValueError(f"unsupported syntax {type(node).__name__}")

    return ev(tree), used


def countdown_answer(completion: str) -> str | None:
    """The expression a completion proposes: the last <answer>..</answer>, else its last line."""
    tagged = extract_tagged(completion)
    if tagged is not None:
        return tagged or None
    lines = [ln.strip() for ln in completion.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    last = lines[-1].split("=")[0].strip()  # "3 * 5 + 7 = 22" -> "3 * 5 + 7"
    return last or None


def score_countdown(expr: str | None, numbers: Sequence[int], target: int, *, use_all: bool = True,
                    partial: float = 0.0) -> float:
    """1.0 if expr uses the numbers by the rules and equals target exactly; `partial` for a
    well-formed expression that breaks a rule or misses the target (reasoning-gym gives 0.05);
    0.0 for no expression or one that does not parse."""
    if not expr:
        return 0.0
    try:
        value, used = evaluate_expression(expr)
    except (ValueError, SyntaxError, ZeroDivisionError, RecursionError, OverflowError):
        return 0.0
    pool = sorted(int(n) for n in numbers)
    if use_all:
        ok_numbers = sorted(used) == pool
    else:
        ok_numbers = all(used.count(u) <= pool.count(u) for u in set(used))
    return 1.0 if ok_numbers and value == Fraction(int(target)) else float(partial)


def _builtin_countdown(rng: random.Random, spec: CountdownSpec) -> Example:
    for _ in range(10_000):
        k = rng.randint(spec.min_numbers, spec.max_numbers)
        numbers = [rng.randint(spec.min_value, spec.max_value) for _ in range(k)]
        expr, value = random_expression(rng, numbers)
        if value.denominator == 1 and spec.min_target <= value <= spec.max_target:
            return countdown_example(numbers, int(value), expr)
    raise ValueError(f"countdown: could not draw a problem with target in [{spec.min_target}, "
                     f"{spec.max_target}] from {spec}; widen the target range")


def countdown_example(numbers: Sequence[int], target: int, solution: str | None = None) -> Example:
    numbers = [int(n) for n in numbers]
    return {"numbers": numbers, "target": int(target), "solution": solution,
            "numbers_csv": ", ".join(map(str, numbers)), "numbers_str": " ".join(map(str, numbers)),
            "question": f"Using the numbers {', '.join(map(str, numbers))}, make {int(target)}."}


def _reasoning_gym_countdown(rng: random.Random, n: int, spec: CountdownSpec) -> list:
    import reasoning_gym

    data = reasoning_gym.create_dataset(
        "countdown", size=n, seed=rng.randrange(2**31), min_numbers=spec.min_numbers,
        max_numbers=spec.max_numbers, min_value=spec.min_value, max_value=spec.max_value,
        min_target=spec.min_target, max_target=spec.max_target)
    out = []
    for entry in data:
        md = entry["metadata"]
        ex = countdown_example(md["numbers"], md["target"], md.get("expression"))
        ex["rg_entry"] = entry
        out.append(ex)
    return out


def have_reasoning_gym() -> bool:
    try:
        import reasoning_gym  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def countdown_task(spec: CountdownSpec | None = None, *, template: str = COUNTDOWN_TEMPLATE,
                   source: str = "auto", partial: float = 0.0,
                   answer_fn: Callable[[str], str | None] = countdown_answer) -> Task:
    """Countdown with `spec` sizes. source: "auto" (reasoning-gym if installed), "reasoning_gym",
    or "builtin" picks the generator. Scoring is ours in both cases, with reasoning-gym's rules
    (all numbers exactly once, value equal to the target) but exact rational arithmetic instead
    of its float tolerance: 1.0 if right, `partial` for a well-formed wrong expression
    (reasoning-gym's scorer uses 0.05), 0.0 when no expression can be parsed (reasoning-gym
    gives 0.01 there; the brief for this project is that malformed output scores 0)."""
    spec = (spec or CountdownSpec()).check()
    if source == "auto":
        source = "reasoning_gym" if have_reasoning_gym() else "builtin"
    if source == "reasoning_gym" and not have_reasoning_gym():
        raise ModuleNotFoundError("countdown source 'reasoning_gym' needs `pip install reasoning-gym` "
                                  "(or use source='builtin')")
    if source not in ("reasoning_gym", "builtin"):
        raise ValueError(f"countdown source must be auto, reasoning_gym or builtin, got {source!r}")

    if source == "reasoning_gym":
        def sampler(rng, n):
            return _reasoning_gym_countdown(rng, n, spec)
    else:
        def sampler(rng, n):
            return [_builtin_countdown(rng, spec) for _ in range(n)]

    def reward(completion, ex):
        return score_countdown(answer_fn(completion), ex["numbers"], ex["target"], use_all=spec.use_all,
                               partial=partial)

    return Task(f"countdown[{source}]", reward, template, sampler, answer_fn)
