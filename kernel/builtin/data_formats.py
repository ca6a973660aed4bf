"""Built-in record formats: messages, sharegpt, alpaca, preference, kto, prompt, text.

Each turns one record into modelloop's canonical record for its kind:

- conversation: ``{"messages": [...], "tools": [...]?, "images": [...]?, "audios": [...]?}``
  (each item's place marked ``<image>`` or ``<audio>`` in the text: ``modelloop.data.media``)
- preference: ``{"prompt": [...], "chosen": [...], "rejected": [...], "images": [...]?}`` (TRL's conversational form)
- kto: ``{"prompt": [...], "completion": [...], "label": bool, "images": [...]?}``
- prompt: ``{"prompt": [...], "images": [...]?, **other columns}`` (extra columns reach the rewards)

Every kind has the ``images``/``audios`` columns as conversations do.
- text: ``{"text": str}``

Registration order is detection order: the more specific formats come first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from modelloop.data.media import COLUMNS, take_media_parts
from modelloop.data.messages import as_messages, check_messages, message
from modelloop.hooks import hookimpl
from modelloop.specs import DatasetFormat

Record = Mapping[str, Any]


def _decoded(value: Any) -> Any:
    """A list stored as JSON text (a CSV cell) becomes the list."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _text(record: Record, field_name: str, *, required: bool = True) -> str:
    value = record.get(field_name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValueError(f"{field_name} is missing or empty")
        return ""
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"{field_name} must be text, got {type(value).__name__}")
    return str(value)


def _with_system(record: Record, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system = record.get("system")
    if system and (not messages or messages[0].get("role") != "system"):
        return [message("system", str(system)), *messages]
    return messages


def _prompt_with_media(record: Record) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The prompt's messages, and its media (``{"images": [...]}``, or nothing)."""
    prompt, taken = take_media_parts(as_messages(_decoded(record.get("prompt")), "user", "prompt"))
    return check_messages(_with_system(record, prompt), ends_with="prompt", field_name="prompt"), _media(record, taken)


def _media(record: Record, from_parts: dict[str, list[str]]) -> dict[str, Any]:
    """The record's media, by column: from its content parts, or its ``images`` and
    ``audios`` columns (a path or a list), whose marks in the text say where each goes."""
    media = {}
    for name in COLUMNS:
        column = _decoded(record.get(name)) or []
        if isinstance(column, str):
            column = [column]
        if from_parts.get(name) and column:
            raise ValueError(f"give {name} as content parts or in the {name} column, not both")
        items = from_parts.get(name) or column
        if items:
            media[name] = list(items)
    return media


def convert_messages(record: Record) -> dict[str, Any]:
    raw, taken = take_media_parts(_decoded(record.get("messages")))
    converted: dict[str, Any] = {"messages": check_messages(raw), **_media(record, taken)}
    if record.get("tools"):
        converted["tools"] = _decoded(record["tools"])
    return converted


SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


def convert_sharegpt(record: Record) -> dict[str, Any]:
    turns = _decoded(record.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise ValueError("conversations must be a non-empty list")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversations[{number}] needs 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise ValueError(
                f"conversations[{number}] has unknown role {turn['from']!r} (expected one of: {', '.join(SHAREGPT_ROLES)})"
            )
        if turn["from"] == "function_call":
            try:
                call = json.loads(turn["value"])
            except (TypeError, json.JSONDecodeError):
                raise ValueError(f"conversations[{number}] function_call value is not JSON") from None
            messages.append(
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]}
            )
        else:
            messages.append(message(role, turn["value"]))
    converted: dict[str, Any] = {
        "messages": check_messages(_with_system(record, messages), field_name="conversations"),
        **_media(record, {}),
    }
    if record.get("tools"):
        converted["tools"] = _decoded(record["tools"])
    return converted


def convert_alpaca(record: Record) -> dict[str, Any]:
    messages = []
    for number, pair in enumerate(_decoded(record.get("history")) or [], start=1):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"history[{number}] must be a [question, answer] pair")
        messages += [message("user", str(pair[0])), message("assistant", str(pair[1]))]
    instruction = _text(record, "instruction")
    extra = _text(record, "input", required=False)
    messages.append(message("user", f"{instruction}\n{extra}" if extra else instruction))
    messages.append(message("assistant", _text(record, "output")))
    return {"messages": check_messages(_with_system(record, messages)), **_media(record, {})}


def _answer(record: Record, field_name: str, prompt: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The assistant side of a preference or KTO record, without a repeated prompt."""
    answer = as_messages(_decoded(record.get(field_name)), "assistant", field_name)
    if answer[: len(prompt)] == prompt:  # a full conversation including the prompt
        answer = answer[len(prompt) :]
    if not answer or answer[0].get("role") != "assistant":
        raise ValueError(f"{field_name} must start with an assistant turn")
    return check_messages([*prompt, *answer], field_name=field_name)[len(prompt) :]


def _implicit_prompt(record: Record) -> list[dict[str, Any]]:
    """The shared leading turns of chosen and rejected, for records without a prompt."""
    chosen = as_messages(_decoded(record.get("chosen")), "assistant", "chosen")
    rejected = as_messages(_decoded(record.get("rejected")), "assistant", "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1].get("role") == "assistant":
        shared -= 1
    if not shared:
        raise ValueError("prompt is missing (and chosen/rejected share no leading user turn)")
    return check_messages(chosen[:shared], ends_with="prompt")


def convert_preference(record: Record) -> dict[str, Any]:
    prompt, media = (
        _prompt_with_media(record)
        if record.get("prompt") is not None
        else (_implicit_prompt(record), _media(record, {}))
    )
    chosen = _answer(record, "chosen", prompt)
    rejected = _answer(record, "rejected", prompt)
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **media}


KTO_LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}  # True == 1, False == 0


def convert_kto(record: Record) -> dict[str, Any]:
    prompt, media = _prompt_with_media(record)
    label = record.get("label")
    if isinstance(label, str):
        label = label.strip().lower()
    if label not in KTO_LABELS:
        raise ValueError(f"label must be true or false, got {record.get('label')!r}")
    return {"prompt": prompt, "completion": _answer(record, "completion", prompt), "label": KTO_LABELS[label], **media}


def convert_prompt(record: Record) -> dict[str, Any]:
    extra = {key: value for key, value in record.items() if key not in ("prompt", "system", *COLUMNS)}
    prompt, media = _prompt_with_media(record)
    return {"prompt": prompt, **extra, **media}


def convert_text(record: Record) -> dict[str, Any]:
    return {"text": _text(record, "text")}


FORMATS = (
    DatasetFormat(
        name="preference",
        description="prompt + chosen/rejected, as strings or message lists",
        kind="preference",
        columns=("chosen", "rejected"),
        convert=convert_preference,
    ),
    DatasetFormat(
        name="kto",
        description="prompt + completion + boolean label",
        kind="kto",
        columns=("completion", "label"),
        convert=convert_kto,
    ),
    DatasetFormat(
        name="messages",
        description="OpenAI-style messages (system/user/assistant/tool, tool calls kept)",
        kind="conversation",
        columns=("messages",),
        convert=convert_messages,
    ),
    DatasetFormat(
        name="sharegpt",
        description="conversations with from/value (human, gpt, system, function_call, observation)",
        kind="conversation",
        columns=("conversations",),
        convert=convert_sharegpt,
    ),
    DatasetFormat(
        name="alpaca",
        description="instruction/input/output, optional system and history",
        kind="conversation",
        columns=("instruction", "output"),
        convert=convert_alpaca,
    ),
    DatasetFormat(
        name="prompt",
        description="prompt only (GRPO); other columns such as solution reach the rewards",
        kind="prompt",
        columns=("prompt",),
        convert=convert_prompt,
        aliases=("prompt-only",),
    ),
    DatasetFormat(
        name="text",
        description="raw text for pretraining",
        kind="text",
        columns=("text",),
        convert=convert_text,
    ),
)


@hookimpl
def register_dataset_formats(register):
    for dataset_format in FORMATS:
        register(dataset_format)
