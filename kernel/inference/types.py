"""What goes into an engine and what comes out, whatever the engine (in-process or HTTP).

Torch-free on purpose: engine plugins that run a server in another Python environment
use these types on the client side only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample; the OpenAI API's fields. ``temperature == 0`` means greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    logprobs: bool = False


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One chat (``messages``) or text (``prompt``) request for a served model or adapter.

    A ``prompt`` may also be token ids, sent as they are (the OpenAI completions API
    allows it), so that a caller that tokenised the prompt itself gets exactly its tokens.
    """

    messages: Sequence[Mapping[str, Any]] | None = None
    prompt: str | Sequence[int] | None = None
    model: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, kw_only=True)
class Completion:
    """One generated choice.

    ``token_ids`` are the tokens generated, with the end-of-turn token when one ended the
    choice (as vLLM returns them); ``text`` leaves it out. Empty when an engine over HTTP
    did not return ids. With ``logprobs``, each token's log-probability under the
    distribution it was drawn from (temperature, top-k and top-p applied: vLLM's
    ``processed_logprobs``, what importance weights need), and ``tokens`` holds each token's
    text (what the OpenAI API reports beside each log-probability).
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    logprobs: tuple[float, ...] | None = None
    tokens: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Generation:
    """The result of one request: its ``n`` choices and the token counts."""

    choices: tuple[Completion, ...]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(len(choice.token_ids) for choice in self.choices)


@dataclass(frozen=True, kw_only=True)
class Delta:
    """A piece of a streamed choice: new text, or (last) the finish reason.

    ``tokens`` and ``prompt_tokens`` count what the engine generated and read, added up over
    a stream's deltas (an engine puts them where it knows them: on a choice's last delta,
    or on one of their own), for the usage a client may ask of a stream.
    """

    index: int
    text: str = ""
    finish_reason: FinishReason | None = None
    tokens: int = 0
    prompt_tokens: int = 0
