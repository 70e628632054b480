"""GSM8K: grade-school maths word problems with a numeric reference answer (after "####").

`gsm8k_examples` loads them with Hugging Face `datasets` (or from a local JSONL file); the
completion's final answer is taken from \\boxed{...}, "####", "answer is ..." or its last
number, and checked with `math-verify` when installed, else numerically. `gsm8k_task` wraps them
in a `reasoning.Task`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from .task import Example, Task, extract_tagged


GSM8K_TEMPLATE = ("{question}\nSolve the problem step by step, then give the final numeric answer "
                  "after '####'.")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def gsm8k_reference(answer_field: str) -> str:
    """The numeric answer after '####' in a GSM8K answer field, commas removed."""
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer field has no '####': {answer_field[-80:]!r}")
    return answer_field.split("####")[-1].strip().replace(",", "")


def _last_boxed(text: str) -> str | None:
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, j = 1, i + len("\\boxed{")
    start = j
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[start:j - 1].strip() if depth == 0 else None


def extract_final_answer(text: str) -> str | None:
    r"""Final answer of a maths completion: \boxed{..}, then '#### x', 'answer is x', <answer>,
    then the last number in the text."""
    for cand in (_last_boxed(text), extract_tagged(text)):
        if cand:
            return cand
    m = re.findall(r"####\s*([^\n]+)", text)
    if m:
        return m[-1].strip()
    m = re.findall(r"answer is[:\s]*\$?\s*([^\s\n]+)", text, flags=re.IGNORECASE)
    if m:
        return m[-1].strip().rstrip(".")
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def parse_number(text: str | None) -> float | None:
    """First number in text ('$1,234.50' -> 1234.5; '3/4' -> 0.75); None if there is none."""
    if not text:
        return None
    t = text.replace(",", "").replace("$", "").strip()
    frac = re.fullmatch(r"(-?\d+)\s*/\s*(\d+)", t)
    if frac and int(frac.group(2)) != 0:
        return int(frac.group(1)) / int(frac.group(2))
    m = _NUMBER.search(t)
    return float(m.group(0).replace(",", "")) if m else None


def have_math_verify() -> bool:
    try:
        import math_verify  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def numeric_match(pred: str | None, reference: str, *, rel_tol: float = 1e-6) -> bool:
    a, b = parse_number(pred), parse_number(reference)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


def math_match(pred: str | None, reference: str, *, use_math_verify: bool | None = None) -> bool:
    """Is pred the same answer as reference? math-verify when installed, else numeric."""
    if not pred:
        return False
    if use_math_verify is None:
        use_math_verify = have_math_verify()
    if use_math_verify:
        from math_verify import parse, verify

        gold, guess = parse(reference), parse(pred)
        if gold and guess and verify(gold, guess):
            return True
    return numeric_match(pred, reference)


def gsm8k_examples(split: str = "test", *, path: str | None = None, limit: int | None = None) -> list:
    """GSM8K examples {"question", "answer" (full solution), "reference" (number)}.

    path: a local .jsonl file with "question" and "answer" fields, or a Hugging Face dataset id /
    directory (default "openai/gsm8k", config "main") loaded with `datasets`."""
    rows: list
    if path and Path(path).is_file():
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    else:
        try:
            import datasets
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError("GSM8K needs Hugging Face `datasets` (pip install 'eggroll-jax[llm]') "
                                      "or a local JSONL file via path=...") from e
        ds = datasets.load_dataset(path or "openai/gsm8k", "main", split=split)
        rows = list(ds)
    out = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        if "question" not in row or "answer" not in row:
            raise ValueError(f"GSM8K row {i} needs 'question' and 'answer' fields, has {sorted(row)}")
        out.append({"question": row["question"], "answer": row["answer"],
                    "reference": gsm8k_reference(row["answer"])})
    return out


def gsm8k_task(examples: Sequence[Example], *, template: str = GSM8K_TEMPLATE,
               use_math_verify: bool | None = None) -> Task:
    """GSM8K reward: 1.0 if the completion's final answer equals the reference, else 0.0."""
    def reward(completion, ex):
        return 1.0 if math_match(extract_final_answer(completion), ex["reference"],
                                 use_math_verify=use_math_verify) else 0.0

    return Task("gsm8k", reward, template, None, extract_final_answer, examples=list(examples))
