"""Environments for GRPO: found by name, their options bound, and proven on the data first.

An environment (``Environment``, registered through ``register_environments``) starts an
episode from each data record; GRPO's rollouts (``modelloop.stages.episodes``) then let
the model act in it turn after turn. Before any model loads, ``bind_environment`` checks
the environment's options (the keyword-only parameters with defaults of its ``start``)
and ``check_environment`` checks that every record has the columns it reads, then starts
an episode on the first record and steps it with a sample answer: a broken environment is
one line naming it, not a stack trace in the first training step.

What an episode earns reaches GRPO as the reward ``environment``: the rollouts hand each
completion's summed reward over as the column ``ENVIRONMENT_REWARD``, and the reward
function reads it back, next to any other reward of the run.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from modelloop.errors import ModelloopError, UnknownNameError
from modelloop.options import keyword_options
from modelloop.registry import ENVIRONMENTS, get_registry
from modelloop.specs import Environment, Episode, Step, Turn

#: The column the rollouts fill with each completion's episode reward.
ENVIRONMENT_REWARD = "environment_reward"

#: What GRPO logs the episode reward as (``rewards/environment/mean``).
REWARD_NAME = "environment"


class EnvironmentFailure(ModelloopError):
    """An environment that cannot be used: unknown, bad options, or it fails on the data."""


@dataclass(frozen=True)
class BoundEnvironment:
    """An environment with its options and turn limit set, ready to start episodes."""

    spec: Environment
    options: Mapping[str, Any]
    max_turns: int

    @property
    def name(self) -> str:
        return self.spec.name

    def start(self, record: Mapping[str, Any]) -> Episode:
        episode = self.spec.start(record, **self.options)
        if not callable(getattr(episode, "step", None)):
            raise EnvironmentFailure(
                f"environment {self.name!r}: start returned a {type(episode).__name__}, not an episode with step(turn)"
            )
        return episode

    def step(self, episode: Episode, turn: Turn) -> Step:
        """The episode's answer to ``turn``, checked: a Step with a finite reward."""
        step = episode.step(turn)
        if not isinstance(step, Step):
            raise EnvironmentFailure(f"environment {self.name!r}: step returned a {type(step).__name__}, not a Step")
        if not isinstance(step.reward, numbers.Real) or not math.isfinite(step.reward):
            raise EnvironmentFailure(f"environment {self.name!r}: step returned the reward {step.reward!r}")
        if not step.done and not step.observation:
            raise EnvironmentFailure(
                f"environment {self.name!r}: a step that is not done must give the model an observation"
            )
        return step


def bind_environment(name: str, options: Mapping[str, Any], max_turns: int | None = None) -> BoundEnvironment:
    """The named environment with ``options`` checked against its own."""
    try:
        spec = get_registry(ENVIRONMENTS).get(name)
    except UnknownNameError as error:
        raise EnvironmentFailure(str(error)) from None
    known = keyword_options(spec.start)
    unknown = sorted(set(options) - set(known))
    if unknown:
        listed = ", ".join(known) or "none"
        raise EnvironmentFailure(f"environment {name!r}: unknown option {unknown[0]!r} (its options: {listed})")
    return BoundEnvironment(spec, dict(options), max_turns or spec.max_turns)


def check_environment(environment: BoundEnvironment, records: Sequence[Mapping[str, Any]]) -> None:
    """Every record has the columns the environment reads; an episode starts on the first
    record and answers a plain reply with a Step."""
    for column in environment.spec.columns:
        missing = next((number for number, record in enumerate(records, start=1) if record.get(column) is None), None)
        if missing is not None:
            raise EnvironmentFailure(
                f"environment {environment.name!r} needs a {column!r} column, and record {missing} of the data has none"
            )
    if not records:
        return
    with failures_named(environment, "on record 1 of the data"):
        environment.step(environment.start(records[0]), Turn(text="I do not know.", number=1))


@contextmanager
def failures_named(environment: BoundEnvironment, doing: str) -> Iterator[None]:
    """Whatever the environment's code raises, as one EnvironmentFailure naming it."""
    try:
        yield
    except EnvironmentFailure:
        raise
    except Exception as error:  # noqa: BLE001 - an environment may raise anything; name it
        raise EnvironmentFailure(
            f"environment {environment.name!r} failed {doing}: {type(error).__name__}: {error}"
        ) from None


def environment_reward(prompts: Any, completions: Any, **columns: Any) -> list[float]:
    """Each completion's episode reward, as the rollouts recorded it."""
    return list(columns[ENVIRONMENT_REWARD])


environment_reward.__name__ = environment_reward.__qualname__ = REWARD_NAME
