"""Built-in rewards, also the metrics of ``modelloop eval``.

- ``exact`` and ``accuracy`` compare a completion with the record's ``solution`` column;
- ``format`` checks the completion against a regular expression (an option);
- ``length`` penalises completions outside a band of characters;
- ``repetition`` penalises repeated n-grams;
- ``reward-model`` scores prompt + completion with a sequence-classification model.

A completion may be a string or, for conversational data, a list of messages (the last
one is the answer). Options are keyword-only parameters with defaults.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelloop.hooks import hookimpl
from modelloop.rewards import answer_text
from modelloop.specs import Reward

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _solutions(columns: dict[str, Any], count: int) -> list[str]:
    solutions = columns.get("solution")
    if solutions is None:
        raise ValueError("this reward needs a 'solution' column in the data")
    return [str(solution) for solution in (solutions if isinstance(solutions, (list, tuple)) else [solutions] * count)]


def exact(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 when the answer, stripped, equals the solution."""
    return [
        float(answer_text(c).strip() == s.strip()) for c, s in zip(completions, _solutions(columns, len(completions)))
    ]


def _normalized(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def final_answer(text: str) -> str:
    """The last ``\\boxed{...}`` if there is one, else the whole text."""
    boxed = _BOXED.findall(text)
    return boxed[-1] if boxed else text


def accuracy(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 when the answer is right: the final answer (the last ``\\boxed{}``, else the
    whole text) has the numeric solution as its last number, or equals a text solution
    ignoring case, spacing and a final full stop."""
    scores = []
    for completion, solution in zip(completions, _solutions(columns, len(completions))):
        answer = final_answer(answer_text(completion))
        expected = final_answer(solution).strip()
        if _NUMBER.fullmatch(expected):
            numbers = _NUMBER.findall(answer.replace(",", ""))
            scores.append(float(bool(numbers) and float(numbers[-1]) == float(expected)))
        else:
            scores.append(float(_normalized(answer) == _normalized(expected)))
    return scores


THINK_ANSWER = r"<think>.*?</think>\s*<answer>.*?</answer>"


def format_match(
    prompts: Sequence[Any], completions: Sequence[Any], *, pattern: str = THINK_ANSWER, **columns: Any
) -> list[float]:
    """1.0 when the whole completion (stripped) matches ``pattern`` (``.`` matches newlines)."""
    compiled = _compiled(pattern)
    return [float(compiled.fullmatch(answer_text(c).strip()) is not None) for c in completions]


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as error:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {error}") from None


def length(
    prompts: Sequence[Any], completions: Sequence[Any], *, min_chars: int = 1, max_chars: int = 2000, **columns: Any
) -> list[float]:
    """0 inside ``[min_chars, max_chars]``; outside, minus the relative distance to the band, down to -1."""
    if not 0 <= min_chars <= max_chars or max_chars == 0:
        raise ValueError(f"need 0 <= min_chars <= max_chars and max_chars > 0, got {min_chars} and {max_chars}")
    scores = []
    for completion in completions:
        size = len(answer_text(completion))
        if size < min_chars:
            scores.append(-(min_chars - size) / min_chars)
        elif size > max_chars:
            scores.append(-min(1.0, (size - max_chars) / max_chars))
        else:
            scores.append(0.0)
    return scores


def repetition(prompts: Sequence[Any], completions: Sequence[Any], *, ngram: int = 3, **columns: Any) -> list[float]:
    """Minus the share of repeated word n-grams: 0 for none, near -1 for a loop."""
    if ngram < 1:
        raise ValueError(f"ngram must be at least 1, got {ngram}")
    scores = []
    for completion in completions:
        words = answer_text(completion).split()
        grams = [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]
        scores.append(-(1 - len(set(grams)) / len(grams)) if grams else 0.0)
    return scores


def reward_model(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    path: str = "",
    batch_size: int = 16,
    max_length: int = 1024,
    **columns: Any,
) -> list[float]:
    """The first logit of a sequence-classification model over prompt + completion, batched.
    ``path``: the model's folder, or the run folder of ``rlhf --method rm``."""
    if not path:
        raise ValueError("set the reward model's folder: reward_options.reward-model.path=DIR")
    import torch

    model, tokenizer = _load_reward_model(str(Path(path).expanduser().resolve()))
    texts = [_joined(tokenizer, prompt, completion) for prompt, completion in zip(prompts, completions)]
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
                add_special_tokens=False,
            )
            scores += model(**batch.to(model.device)).logits[:, 0].float().tolist()
    return scores


@functools.cache
def _load_reward_model(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from modelloop.artifacts import is_run
    from modelloop.models.loading import resolve_model_source

    if is_run(path):  # a reward model's run: its model/ holds the whole model
        source = resolve_model_source(path)
        if source.adapter is not None:
            raise ValueError(f"{path} is an adapter run; a reward model is a run of rlhf --method rm")
        path = source.base
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{path} is not a model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _joined(tokenizer: Any, prompt: Any, completion: Any) -> str:
    """Prompt and completion as one text: through the reward model's chat template for conversations."""
    if isinstance(prompt, str):
        return prompt + answer_text(completion)
    messages = [*prompt, {"role": "assistant", "content": answer_text(completion)}]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{message['role']}: {message['content']}" for message in messages)


REWARDS = (
    Reward(name="exact", description="answer == solution (stripped)", score=exact, columns=("solution",)),
    Reward(
        name="accuracy",
        description="right answer: last number or \\boxed{}, or text ignoring case and spacing",
        score=accuracy,
        columns=("solution",),
    ),
    Reward(
        name="format",
        description="1 when the completion matches a regular expression (option: pattern)",
        score=format_match,
    ),
    Reward(
        name="length", description="penalty outside a band of characters (options: min_chars, max_chars)", score=length
    ),
    Reward(name="repetition", description="penalty for repeated word n-grams (option: ngram)", score=repetition),
    Reward(
        name="reward-model",
        description="a sequence-classification model's score of prompt + completion (option: path)",
        score=reward_model,
        needs_model=True,
    ),
)


@hookimpl
def register_rewards(register):
    for reward in REWARDS:
        register(reward)
