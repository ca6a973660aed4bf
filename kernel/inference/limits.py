"""The limits every in-process engine holds a prompt to, refused in the same words whatever
the engine (the server answers each with a 400 carrying that line)."""

from __future__ import annotations

from collections.abc import Sequence

from modelloop.errors import EngineError


def check_prompt_ids(
    ids: Sequence[int], *, max_tokens: int, context_length: int, vocabulary: int | None = None
) -> list[int]:
    """``ids`` if they can be served: not empty, within ``vocabulary`` (for a prompt sent as
    token ids: text the engine tokenised itself cannot leave it), and leaving room for
    ``max_tokens`` in the context."""
    ids = list(ids)
    if vocabulary is not None and not all(isinstance(token, int) and 0 <= token < vocabulary for token in ids):
        raise EngineError(f"a token-id prompt holds ids outside the vocabulary (0..{vocabulary - 1})")
    if not ids:
        raise EngineError("the prompt is empty")
    if len(ids) + max_tokens > context_length:
        raise EngineError(
            f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the context length ({context_length})"
        )
    return ids
