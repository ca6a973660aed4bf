"""GRPO rollouts that loop: the model's turn, the environment's step, its observation, again.

Each completion of a GRPO group is an episode of the run's environment, started from the
group's data record. The first turn is the group's one request with ``n`` choices, as
without an environment; then, until every episode is done, each live episode's turn is
read (its tool calls parsed with the chat template's own ``ToolCallFormat``), stepped,
and the observation appended, and the live episodes' next turns are one batch of
requests to the engine.

The completion handed to TRL is the episode's tokens, end to end: every token the model
generated, exactly as the engine returned it (never re-tokenised from text), and between
its turns the observations' tokens, which ``env_mask`` marks 0 so that they carry no loss.
An observation's tokens are what the chat template renders after the model's end of turn
(a tool result, the next user turn) through the next generation prompt: the text the
model would have been shown by any engine rendering the conversation.

An episode ends when its environment says done or at its turn limit. A turn cut at the
length limit is the environment's to judge (``Turn.finished``); if the episode goes on, the
end of turn the model did not write is added with the observation, masked as it is. Its reward, the sum over its turns, goes to GRPO as the column
``ENVIRONMENT_REWARD`` (read by the ``environment`` reward).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelloop.chat import TemplateError
from modelloop.environments import ENVIRONMENT_REWARD, BoundEnvironment, EnvironmentFailure, failures_named
from modelloop.inference.types import Completion, Generation
from modelloop.specs import Episode, Turn


@dataclass
class Transcript:
    """One episode as it is played: its conversation and its tokens so far."""

    episode: Episode
    messages: list[Mapping[str, Any]]
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1: the model's token, 0: an observation's
    logprobs: list[float] = field(default_factory=list)  # the model's tokens' (NaN: an observation's)
    reward: float = 0.0
    turns: int = 0
    done: bool = False

    def add(self, ids: Sequence[int], *, generated: bool, logprobs: Sequence[float] | None = None) -> None:
        self.completion_ids.extend(ids)
        self.mask.extend([int(generated)] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [math.nan] * len(ids))


class Episodes:
    """Plays GRPO's completions as episodes of one environment."""

    def __init__(
        self, environment: BoundEnvironment, records: Sequence[Mapping[str, Any]], *, tokenizer: Any, chat: Any
    ) -> None:
        self.environment = environment
        self.tokenizer = tokenizer
        self.chat = chat
        self.tools = list(environment.spec.tools) or None
        if self.tools and chat.tool_calls is None:
            raise EnvironmentFailure(
                f"environment {environment.name!r} offers tools, and the chat template {chat.name!r} declares no "
                "tool-call format to read the model's calls with (--template one that does: qwen2, llama3, ...)"
            )
        self.records = records_by_prompt(environment.name, records)

    def play(
        self,
        groups: Sequence[tuple[Any, list[int], int]],
        first_turns: Sequence[Generation],
        generate: Callable[[list[list[int]]], list[Completion]],
        completion_ids: Callable[[Completion], list[int]],
        logprobs: Callable[[Completion], list[float]] | None = None,
    ) -> dict[str, list[Any]]:
        """Every group's episodes to their end: ``groups`` are (prompt, its ids, completions
        wanted), ``first_turns`` the engine's answers to them; ``generate`` answers a batch of
        token-id prompts with one completion each. With ``logprobs`` (a choice's, per token),
        the episodes' log-probabilities come too, NaN for the observations' tokens (TRL's
        importance weights leave those at 1)."""
        transcripts: list[Transcript] = []
        turns: list[tuple[Transcript, Completion]] = []
        for (prompt, ids, _), generation in zip(groups, first_turns, strict=True):
            record = self.records[prompt_key(prompt)]
            for choice in generation.choices:
                transcript = Transcript(self._start(record), [dict(message) for message in prompt], list(ids))
                transcripts.append(transcript)
                turns.append((transcript, choice))
        while turns:
            for transcript, choice in turns:
                self._take_turn(
                    transcript,
                    completion_ids(choice),
                    logprobs(choice) if logprobs is not None else None,
                    finished=choice.finish_reason == "stop",
                )
            live = [transcript for transcript in transcripts if not transcript.done]
            if not live:
                break
            answers = generate([transcript.prompt_ids + transcript.completion_ids for transcript in live])
            turns = list(zip(live, answers, strict=True))
        played = {
            "prompt_ids": [transcript.prompt_ids for transcript in transcripts],
            "completion_ids": [transcript.completion_ids for transcript in transcripts],
            "env_mask": [transcript.mask for transcript in transcripts],
            ENVIRONMENT_REWARD: [transcript.reward for transcript in transcripts],
        }
        if logprobs is not None:
            played["logprobs"] = [transcript.logprobs for transcript in transcripts]
        return played

    def _start(self, record: Mapping[str, Any]) -> Episode:
        with failures_named(self.environment, "to start an episode"):
            episode = self.environment.start(record)
        return episode

    def _take_turn(
        self, transcript: Transcript, ids: list[int], logprobs: list[float] | None, *, finished: bool
    ) -> None:
        transcript.add(ids, generated=True, logprobs=logprobs)
        transcript.turns += 1
        turn = self.read_turn(ids, finished=finished, number=transcript.turns)
        with failures_named(self.environment, f"on turn {turn.number}"):
            step = self.environment.step(transcript.episode, turn)
        transcript.reward += float(step.reward)
        if step.done or transcript.turns >= self.environment.max_turns:
            transcript.done = True
            return
        said = as_message(turn)
        transcript.add(
            self.observation_ids(transcript.messages, said, step.observation, closed=finished), generated=False
        )
        transcript.messages.extend([said, *step.observation])

    def read_turn(self, ids: Sequence[int], *, finished: bool, number: int) -> Turn:
        """The model's turn as the environment reads it: its text without special tokens,
        and its tool calls, found in the text as generated (markers included)."""
        as_generated = self.tokenizer.decode(ids, skip_special_tokens=False)
        calls = self.chat.tool_calls.parse(as_generated) if self.tools else ()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for end in self.chat.end_of_turn:
            text = text.removesuffix(end)
        return Turn(text=text.strip(), tool_calls=calls, finished=finished, number=number)

    def observation_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        said: Mapping[str, Any],
        observation: Sequence[Mapping[str, Any]],
        *,
        closed: bool = True,
    ) -> list[int]:
        """The tokens between the model's end of turn and its next turn: what the template
        renders for the observation, through the next generation prompt (from the end of
        turn on, for a turn the model did not close)."""
        before = self.chat.render(messages, add_generation_prompt=False, tools=self.tools)
        after = self.chat.render([*messages, said, *observation], add_generation_prompt=True, tools=self.tools)
        shared = len(os.path.commonprefix([before, after]))
        # only what closes a whole conversation may differ (Phi-3's <|endoftext|>), not a turn of it
        if any(end in before[shared:] for end in self.chat.end_of_turn):
            raise TemplateError(
                f"the chat template {self.chat.name!r} renders the conversation so far differently once an "
                "observation follows it; an environment's episodes need a template that only appends"
            )
        rest = after[shared:]
        ends = sorted((rest.find(end), end) for end in self.chat.end_of_turn if end in rest)
        if not ends:
            raise TemplateError(
                f"the chat template {self.chat.name!r} ends the model's turn with none of {self.chat.end_of_turn}"
            )
        at, end = ends[0]
        return self.tokenizer(rest[at + len(end) if closed else at :], add_special_tokens=False)["input_ids"]


def as_message(turn: Turn) -> dict[str, Any]:
    """The model's turn as a chat message, for the template to render what follows it."""
    if not turn.tool_calls:
        return {"role": "assistant", "content": turn.text}
    calls = [
        {"type": "function", "function": {"name": call.name, "arguments": call.arguments or {}}}
        for call in turn.tool_calls
    ]
    return {"role": "assistant", "content": "", "tool_calls": calls}


def records_by_prompt(name: str, records: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The records by their prompts: TRL hands the rollouts prompts alone, and an episode
    starts from the whole record. Two records with one prompt must be the same record."""
    found: dict[str, Mapping[str, Any]] = {}
    for number, record in enumerate(records, start=1):
        kept = found.setdefault(prompt_key(record["prompt"]), record)
        if kept != record:
            raise EnvironmentFailure(
                f"environment {name!r}: record {number} has the prompt of an earlier record and other columns; "
                "an episode starts from the record its prompt finds, so each prompt may have one record"
            )
    return found


def prompt_key(prompt: Any) -> str:
    """A prompt as a key, the same for a record and for the copy TRL hands the rollouts
    (``datasets`` gives every message each key any message has, as None)."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(
        [{key: value for key, value in message.items() if value is not None} for message in prompt],
        sort_keys=True,
        default=str,
    )
