"""Rewards: scoring a sample batch gives one finite number (or None) per completion,
for chat completions and for plain text, checked by the kernel's own checks (those a
GRPO run applies to every call: ``modelloop.rewards.check_on_sample``).

The sample prompts carry a ``solution`` column, and every other column a reward
declares gets a short text. A reward that loads a model (``needs_model``) is skipped:
the kit has no model for it to score with.
"""

from __future__ import annotations

from typing import Any

from modelloop.specs import Reward
from modelloop.testing.kit import Broken, Check, Skip
from modelloop.testing.workspace import Workspace

RECORDS = (
    {"prompt": [{"role": "user", "content": "What is 2+3?"}], "solution": "5"},
    {"prompt": [{"role": "user", "content": "Name a colour."}], "solution": "red"},
)


def checks(reward: Reward) -> list[Check]:
    return [Check("reward", reward, "scores a sample batch: one finite number per completion", scores_a_sample)]


def scores_a_sample(reward: Reward, workspace: Workspace) -> None:
    from modelloop.rewards import RewardError, bind, check_on_sample, sample_batch

    if reward.needs_model:
        raise Skip("it loads a model to score with (needs_model), and the kit gives it none")
    records = [
        {**record, **{column: "sample text" for column in reward.columns if column not in record}} for record in RECORDS
    ]
    bound = bind(reward.name, {})
    prompts, completions, columns = sample_batch(records)
    try:
        check_on_sample(bound, prompts, completions, columns)
        check_on_sample(bound, *as_text(prompts[:2], completions[:2], columns))
    except RewardError as error:
        raise Broken(str(error).removeprefix(f"reward {reward.name!r} ")) from None


def as_text(
    prompts: list[Any], completions: list[Any], columns: dict[str, list[Any]]
) -> tuple[list[str], list[str], dict[str, list[Any]]]:
    """The first prompt's batch as plain text, the shape GRPO gives for text prompts."""
    texts = [prompt[-1]["content"] for prompt in prompts]
    return (
        texts,
        [completion[-1]["content"] for completion in completions],
        {key: values[: len(texts)] for key, values in columns.items()},
    )
