"""A reasoning task with a verifiable reward: prompts from examples, a never-raising scorer.

`Task` turns examples (dicts) into prompts and scores decoded completions against them;
`safe_reward` makes any reward function total (malformed, empty, absurdly long or raising
completions score 0.0). Concrete tasks: reasoning.countdown_task, gsm8k.gsm8k_task,
custom_task(reward_fn).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

Example = dict  # {"question": str, ...task fields...}
RewardFn = Callable[[str, Example], float]

MAX_COMPLETION_CHARS = 20_000  # longer completions are scored 0 without parsing



def safe_reward(fn: RewardFn, completion, example: Example) -> float:
    """fn(completion, example) as a finite float; 0.0 for malformed input or any error."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return 0.0
    try:
        r = float(fn(completion, example))
    except Exception:  # noqa: BLE001 - a reward must never crash training
        return 0.0
    return r if math.isfinite(r) else 0.0


@dataclass
class Task:
    """A reasoning task: examples -> prompt text; (completion, example) -> reward.

    template: str.format template over the example's fields ("{question}", "{numbers}", ...).
    sampler: (random.Random, n) -> list of examples (None: the task has a fixed list only).
    answer_fn: (completion) -> extracted answer string or None (for diagnostics)."""

    name: str
    reward_fn: RewardFn
    template: str = "{question}"
    sampler: Callable[[random.Random, int], list] | None = None
    answer_fn: Callable[[str], str | None] = lambda text: text.strip() or None
    examples: list = field(default_factory=list)

    def prompt(self, example: Example) -> str:
        try:
            return self.template.format(**example)
        except KeyError as e:
            raise ValueError(f"prompt template {self.template!r} uses field {e} that {self.name} examples "
                             f"do not have; available: {sorted(example)}") from None

    def sample(self, rng: random.Random, n: int) -> list:
        if self.sampler is not None:
            return self.sampler(rng, n)
        if not self.examples:
            raise ValueError(f"task {self.name} has neither a sampler nor examples")
        return [self.examples[rng.randrange(len(self.examples))] for _ in range(n)]

    def reward(self, completion: str, example: Example) -> float:
        return safe_reward(self.reward_fn, completion, example)

    def score_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        return np.asarray([self.reward(c, e) for c, e in zip(completions, examples)], np.float32)

    def answer(self, completion: str) -> str | None:
        try:
            return self.answer_fn(completion) if isinstance(completion, str) else None
        except Exception:  # noqa: BLE001
            return None


def custom_task(reward_fn: RewardFn, examples: Sequence[Example] | None = None, *, name: str = "custom",
                template: str = "{question}", sampler=None) -> Task:
    """Any user reward on decoded text. reward_fn(completion: str, example: dict) -> float."""
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable (completion, example) -> float, got {type(reward_fn).__name__}")
    return Task(name, reward_fn, template, sampler, examples=list(examples or []))


def extract_tagged(text: str, tag: str = "answer") -> str | None:
    """Content of the last <tag>...</tag> in text (None if absent)."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None
