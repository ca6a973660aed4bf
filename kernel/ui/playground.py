"""The playground's engine sessions: a run or export chatted with is loaded once, on the
first message, by the engine the user picked, and answers every later message."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any


class Playground:
    """Engine sessions by (engine, model), started on first use and closed with the UI."""

    def __init__(self) -> None:
        self.sessions: dict[tuple[str, str], Any] = {}
        self.lock = threading.Lock()

    def answer(
        self, model: str, messages: Sequence[Mapping[str, Any]], *, engine: str = "hf", **sampling: Any
    ) -> dict[str, Any]:
        """The model's next turn after ``messages``, with the sampling settings given
        (``max_tokens``, ``temperature``, ``top_p``)."""
        from modelloop.inference.types import GenerationRequest, SamplingParams

        session = self._session(engine, model)
        request = GenerationRequest(messages=list(messages), params=SamplingParams(**sampling))
        session.check(request)
        choice = session.generate([request])[0].choices[0]
        return {"text": choice.text, "tokens": len(choice.token_ids), "finish_reason": choice.finish_reason}

    def _session(self, engine: str, model: str) -> Any:
        from modelloop.registry import ENGINES, get_registry

        with self.lock:  # one load per model, however many pages ask at once
            key = (engine, model)
            if key not in self.sessions:
                self.sessions[key] = get_registry(ENGINES).get(engine).start(model, options={})
            return self.sessions[key]

    def close(self) -> None:
        with self.lock:
            for session in self.sessions.values():
                session.close()
            self.sessions.clear()
