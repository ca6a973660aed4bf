"""Rewards for GRPO: found by name, import path or file, and proven to work before training.

A reward is named three ways on the command line (``--reward``) or in a config:

- ``accuracy``: a reward registered by a plugin (or built in);
- ``my_pkg.rewards:politeness``: a module on the Python path and an attribute in it;
- ``./my_reward.py:score``: a Python file and an attribute in it.

The attribute is a ``Reward`` spec or a plain function ``score(prompts, completions,
**columns)``. Its keyword-only parameters with defaults are its options (set with
``reward_options``). Each reward is then called once on a sample batch made from the
data, so a wrong signature, a wrong number of scores, a score that is not a number, or
an exception is one message naming the reward before any model loads, not a stack trace
an hour into a run.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloop.errors import ModelloopError, PluginError, UnknownNameError
from modelloop.options import keyword_options
from modelloop.registry import REWARDS, get_registry
from modelloop.specs import Reward


class RewardError(ModelloopError):
    """A reward that cannot be used: not found, a bad signature or options, or it fails on a sample."""


@dataclass(frozen=True)
class BoundReward:
    """A reward ready to score: its options bound, named as GRPO logs it."""

    name: str
    score: Callable[..., Any]
    needs_model: bool
    columns: tuple[str, ...]


def answer_text(completion: Any) -> str:
    """The text of a completion: a string, or for chat data the last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content") or "")
    return str(completion)


def find_reward(reference: str) -> Reward:
    """The reward a name, ``module:attribute`` or ``file.py:attribute`` refers to."""
    if ":" not in reference:
        try:
            return get_registry(REWARDS).get(reference)
        except UnknownNameError as error:
            raise RewardError(str(error)) from None
    location, _, attribute = reference.rpartition(":")
    module = _load_file(location, reference) if location.endswith(".py") else _import(location, reference)
    found = getattr(module, attribute, None)
    if found is None:
        raise RewardError(f"reward {reference!r}: {location} has no attribute {attribute!r}")
    if isinstance(found, Reward):
        return found
    if not callable(found):
        raise RewardError(f"reward {reference!r}: {attribute} is a {type(found).__name__}, not a function or a Reward")
    doc = inspect.getdoc(found) or ""
    try:
        return Reward(name=reference, description=doc.split("\n", 1)[0] or attribute, score=found)
    except PluginError:
        raise RewardError(
            f"reward {reference!r}: {attribute} must accept (prompts, completions, **columns); "
            f"it is {attribute}{inspect.signature(found)}"
        ) from None


def _import(module_name: str, reference: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except (Exception, SystemExit) as error:  # noqa: BLE001 - whatever the module raises (or exits with), name the reward
        raise RewardError(
            f"reward {reference!r}: cannot import {module_name}: {type(error).__name__}: {error}"
        ) from None


def _load_file(location: str, reference: str) -> Any:
    path = Path(location).expanduser().resolve()
    if not path.is_file():
        raise RewardError(f"reward {reference!r}: no such file {path}")
    name = f"modelloop_reward_{path.stem}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except (Exception, SystemExit) as error:  # noqa: BLE001 - a module may raise, or exit, at import
        del sys.modules[name]
        raise RewardError(
            f"reward {reference!r}: {path.name} failed to load: {type(error).__name__}: {error}"
        ) from None
    return module


def reward_options(reward: Reward) -> dict[str, Any]:
    """A reward's options and their defaults: the keyword-only parameters of ``score`` that
    have defaults (keyword-only ones without a default are data columns it requires)."""
    return keyword_options(reward.score)


#: ``short=reference``: a reward given a name for its options and metrics.
NAMED = re.compile(r"(?P<name>[A-Za-z_][\w-]*)=(?P<reference>.+)")


def split_name(given: str) -> tuple[str, str]:
    """The name a reward is known by (options, metrics) and what it refers to:
    ``bonus=./mine.py:score`` -> ``("bonus", "./mine.py:score")``; without a short name,
    the reference is the name."""
    named = NAMED.fullmatch(given)
    return (named["name"], named["reference"]) if named else (given, given)


def bind(given: str, options: Mapping[str, Any]) -> BoundReward:
    """The reward with its options checked and bound (``given`` may carry a short name)."""
    name, reference = split_name(given)
    reward = find_reward(reference)
    known = reward_options(reward)
    unknown = sorted(set(options) - set(known))
    if unknown:
        listed = ", ".join(known) or "none"
        raise RewardError(f"reward {name!r}: unknown option {unknown[0]!r} (its options: {listed})")
    if name == reference:
        name = reward.name
    original, bound_options = reward.score, dict(options)
    # A function named after the reward: GRPO logs each reward under its function's name.
    # Its scores are checked on every call: one NaN would silently zero GRPO's advantages.
    if inspect.iscoroutinefunction(original):

        async def score(prompts: Any, completions: Any, **columns: Any) -> Any:
            return checked_scores(
                name, await original(prompts, completions, **columns, **bound_options), len(completions)
            )

    else:

        def score(prompts: Any, completions: Any, **columns: Any) -> Any:
            return checked_scores(name, original(prompts, completions, **columns, **bound_options), len(completions))

    score.__name__ = score.__qualname__ = name
    return BoundReward(name=name, score=score, needs_model=reward.needs_model, columns=reward.columns)


def resolve_rewards(
    references: Sequence[str], weights: Sequence[float] | None, options: Mapping[str, Mapping[str, Any]]
) -> list[BoundReward]:
    """Every reward named, with its options; the weights (one each) are checked here and
    given to GRPO as ``reward_weights``."""
    if not references:
        raise RewardError(
            "GRPO needs at least one reward: --reward accuracy (or module:function, or file.py:function), or an --environment"
        )
    if weights and len(weights) != len(references):
        raise RewardError(f"{len(weights)} reward weights for {len(references)} rewards")
    names = [split_name(reference)[0] for reference in references]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise RewardError(f"two rewards are named {twice!r}; give one a short name: --reward other={twice}")
    stray = sorted(set(options) - set(names))
    if stray:
        raise RewardError(f"reward_options for {stray[0]!r}, which is not one of the rewards ({', '.join(names)})")
    return [bind(reference, options.get(name, {})) for reference, name in zip(references, names)]


def sample_batch(
    records: Sequence[Mapping[str, Any]], size: int = 2
) -> tuple[list[Any], list[Any], dict[str, list[Any]]]:
    """A few prompts from the data, each with two completions (the solution when there is
    one, and a wrong answer), in the shapes GRPO hands to rewards."""
    prompts: list[Any] = []
    completions: list[Any] = []
    keys = sorted({key for record in records[:size] for key in record} - {"prompt"})
    columns: dict[str, list[Any]] = {key: [] for key in keys}
    for record in records[:size]:
        texts = [str(record["solution"]) if record.get("solution") is not None else "42", "I do not know."]
        for text in texts:
            prompts.append(record["prompt"])
            completions.append([{"role": "assistant", "content": text}])
            for key in keys:
                columns[key].append(record.get(key))
    return prompts, completions, columns


def check_columns(rewards: Sequence[BoundReward], records: Sequence[Mapping[str, Any]]) -> None:
    """Every record has the columns each reward declares it needs (``solution``, ...)."""
    for reward in rewards:
        for column in reward.columns:
            missing = next(
                (number for number, record in enumerate(records, start=1) if record.get(column) is None), None
            )
            if missing is not None:
                raise RewardError(
                    f"reward {reward.name!r} needs a {column!r} column, and record {missing} of the data has none"
                )


def check_on_sample(
    reward: BoundReward, prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Any]
) -> list[float]:
    """Call the reward once; one clear RewardError for anything GRPO could not use."""
    from transformers import TrainerState

    extras = {
        "completion_ids": [[] for _ in completions],
        "trainer_state": TrainerState(),
        "log_extra": _ignore,
        "log_metric": _ignore,
    }
    try:
        scores = reward.score(prompts, completions, **columns, **extras)
        if inspect.isawaitable(scores):
            scores = asyncio.run(_awaited(scores))
    except RewardError:
        raise
    except Exception as error:  # noqa: BLE001 - a reward may raise anything; name it
        raise RewardError(
            f"reward {reward.name!r} failed on a sample batch of {len(completions)}: {type(error).__name__}: {error}"
        ) from None
    return scores


def checked_scores(name: str, scores: Any, count: int) -> list[float | None]:
    """``scores`` as a list GRPO can use, or a RewardError naming the reward and the completion.

    One score per completion, each a finite number or None (not applicable): a NaN or
    infinity would pass through the group's mean into every advantage of its group.
    """
    if isinstance(scores, (str, bytes, Mapping)) or not isinstance(scores, Sequence) and not hasattr(scores, "tolist"):
        raise RewardError(
            f"reward {name!r} returned a {type(scores).__name__}; it must return a list of numbers, one per completion"
        )
    scores = list(scores.tolist() if hasattr(scores, "tolist") else scores)
    if len(scores) != count:
        raise RewardError(
            f"reward {name!r} returned {len(scores)} scores for {count} completions; it must return one per completion"
        )
    for index, score in enumerate(scores):
        if score is not None and not isinstance(score, numbers.Real):
            raise RewardError(
                f"reward {name!r} returned {score!r} ({type(score).__name__}) for completion {index}; scores must be numbers (or None: not applicable)"
            )
        if score is not None and not math.isfinite(score):
            raise RewardError(
                f"reward {name!r} returned {score} for completion {index}; scores must be finite numbers (or None: not applicable)"
            )
    return scores


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _ignore(*args: Any, **kwargs: Any) -> None:
    """Stands in for GRPO's logging callbacks during the sample call."""
