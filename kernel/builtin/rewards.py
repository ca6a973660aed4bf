"""Built-in rewards, also the metrics of ``modelloop eval``: ``exact`` and ``accuracy``.

Both compare a completion with the record's ``solution`` column. A completion may be a
string or, for conversational data, a list of messages (the last one is the answer).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from modelloop import hookimpl
from modelloop.specs import Reward

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


def _solutions(columns: dict[str, Any], count: int) -> list[str]:
    solutions = columns.get("solution")
    if solutions is None:
        raise ValueError("this reward needs a 'solution' column in the data")
    return [str(solution) for solution in (solutions if isinstance(solutions, (list, tuple)) else [solutions] * count)]


def exact(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 when the answer, stripped, equals the solution."""
    return [float(answer_text(c).strip() == s.strip()) for c, s in zip(completions, _solutions(columns, len(completions)))]


def _normalized(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def accuracy(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 when the answer is right: the last number equals a numeric solution, or the
    text equals the solution ignoring case, spacing and a final full stop."""
    scores = []
    for completion, solution in zip(completions, _solutions(columns, len(completions))):
        answer = answer_text(completion)
        if _NUMBER.fullmatch(solution.strip()):
            numbers = _NUMBER.findall(answer)
            scores.append(float(bool(numbers) and float(numbers[-1]) == float(solution)))
        else:
            scores.append(float(_normalized(answer) == _normalized(solution)))
    return scores


REWARDS = (
    Reward(name="exact", description="answer == solution (stripped)", score=exact, columns=("solution",)),
    Reward(name="accuracy", description="right answer: last number, or text ignoring case and spacing", score=accuracy, columns=("solution",)),
)


@hookimpl
def register_rewards(register):
    for reward in REWARDS:
        register(reward)
