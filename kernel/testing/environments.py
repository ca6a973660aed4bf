"""Environments: an episode starts on a sample record and answers a plain turn and a tool
call with a Step, by the checks a GRPO run applies (``modelloop.environments``).

The sample record has a prompt, a ``solution`` and a short text in every other column
the environment declares. A tool call is made only to an environment that offers tools:
to its first tool, with no arguments (an episode must answer a call it cannot use, not
raise).
"""

from __future__ import annotations

from modelloop.specs import Environment, ToolCall, Turn
from modelloop.testing.kit import Broken, Check
from modelloop.testing.workspace import Workspace

RECORD = {"prompt": [{"role": "user", "content": "What is 2+3?"}], "solution": "5"}


def checks(environment: Environment) -> list[Check]:
    return [
        Check("environment", environment, "an episode answers a plain turn with a Step", answers_a_turn),
        Check("environment", environment, "an episode answers a tool call it cannot use", answers_a_bad_call),
    ]


def sample_record(environment: Environment) -> dict:
    return {**RECORD, **{column: "sample text" for column in environment.columns if column not in RECORD}}


def answers_a_turn(environment: Environment, workspace: Workspace) -> None:
    from modelloop.environments import EnvironmentFailure, bind_environment, check_environment

    try:
        check_environment(bind_environment(environment.name, {}), [sample_record(environment)])
    except EnvironmentFailure as error:
        raise Broken(str(error).removeprefix(f"environment {environment.name!r} ")) from None


def answers_a_bad_call(environment: Environment, workspace: Workspace) -> None:
    from modelloop.environments import bind_environment
    from modelloop.testing.kit import Skip

    if not environment.tools:
        raise Skip("it offers no tools")
    bound = bind_environment(environment.name, {})
    name = environment.tools[0].get("function", environment.tools[0])["name"]
    try:
        bound.step(bound.start(sample_record(environment)), Turn(text="", tool_calls=(ToolCall(name, {}),)))
    except Exception as error:  # noqa: BLE001 - whatever it raises is the finding
        raise Broken(f"a call of {name} with no arguments raised {type(error).__name__}: {error}") from None
