"""The canonical conversation: OpenAI-style messages, checked once for every format.

A message is ``{"role": system|user|assistant|tool, "content": str}``; an assistant
message may carry ``tool_calls`` (kept as given) and then may have empty content. Each
check raises ``ValueError`` with the reason a user can act on; the caller adds the
file and line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

ROLES = ("system", "user", "assistant", "tool")

#: Which roles may follow which (None: the start of a conversation).
_MAY_FOLLOW: dict[str | None, tuple[str, ...]] = {
    None: ("system", "user"),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user", "tool"),
    "tool": ("tool", "assistant"),
}


def message(role: str, content: Any) -> dict[str, Any]:
    """A canonical message from a role and text."""
    return {"role": role, "content": content}


def check_messages(
    raw: Any, *, ends_with: Literal["assistant", "prompt"] | None = "assistant", field_name: str = "messages"
) -> list[dict[str, Any]]:
    """Validate a list of messages and return canonical copies.

    :param ends_with: ``assistant``: a conversation to train on (at least one assistant
        turn, the last turn the assistant's); ``prompt``: a prompt awaiting an answer (the
        last turn a user's or tool's); None: any complete sequence of turns.
    """
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)) or not raw:
        raise ValueError(f"{field_name} must be a non-empty list of messages")
    messages: list[dict[str, Any]] = []
    previous: str | None = None
    for number, item in enumerate(raw, start=1):
        where = f"{field_name}[{number}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where} is not an object")
        role = item.get("role")
        if role not in ROLES:
            raise ValueError(f"{where} has unknown role {role!r} (expected one of: {', '.join(ROLES)})")
        if role not in _MAY_FOLLOW[previous]:
            after = f"after a {previous} turn" if previous else "first"
            raise ValueError(f"{where}: a {role} turn cannot come {after} (roles must alternate)")
        if role == "tool" and previous == "assistant" and not messages[-1].get("tool_calls"):
            raise ValueError(f"{where}: a tool turn must follow an assistant turn with tool_calls")
        content = item.get("content")
        if content is None and item.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"{where} content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip() and not item.get("tool_calls"):
            raise ValueError(f"{where} is an empty assistant turn")
        messages.append({**item, "content": content})
        previous = role
    if ends_with == "assistant" and previous != "assistant":
        raise ValueError(f"{field_name} must end with an assistant turn (it ends with a {previous} turn)")
    if ends_with == "prompt" and previous not in ("user", "tool"):
        raise ValueError(f"{field_name} must end with a user turn to answer (it ends with a {previous} turn)")
    return messages


def as_messages(value: Any, role: str, field_name: str) -> list[dict[str, Any]]:
    """A string becomes one message of ``role``; a list is taken as messages."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{field_name} is empty")
        return [message(role, value)]
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        return [dict(item) if isinstance(item, Mapping) else item for item in value]
    raise ValueError(f"{field_name} must be a string or a list of messages")
