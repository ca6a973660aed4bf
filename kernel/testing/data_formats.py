"""Dataset formats: ``convert`` turns a record of the format's columns into a canonical
record of its kind, and ``matches`` (``detect``) accepts no record that lacks a column.

A spec holds no sample records, so the kit makes one by a small convention: each column
gets a value from ``SAMPLE_VALUES`` by its name (OpenAI messages for ``messages``,
ShareGPT turns for ``conversations``, ``True`` for ``label``) or else a short text, and
a format of a prompted kind (preference, kto, prompt) also gets a ``prompt``. A format
that refuses that record with a ValueError is skipped with its reason: the kit then has
nothing to check its output with. A record missing a column is the kernel's to refuse
(before ``convert`` is called), so that is not asked of the format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, get_args

from modelloop.specs import DatasetFormat, DatasetKind
from modelloop.testing.kit import Broken, Check, Skip
from modelloop.testing.workspace import Workspace

TEXT = "What is 2+3? It is 5."
SAMPLE_VALUES: dict[str, Any] = {
    "messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}],
    "conversations": [{"from": "human", "value": "What is 2+3?"}, {"from": "gpt", "value": "5"}],
    "prompt": "What is 2+3?",
    "chosen": "5",
    "rejected": "6",
    "completion": "5",
    "label": True,
}
#: The kinds whose canonical record starts with a prompt.
PROMPTED = ("preference", "kto", "prompt")


def checks(dataset_format: DatasetFormat) -> list[Check]:
    return [
        Check(
            "dataset format",
            dataset_format,
            f"convert turns a record of its columns into a canonical {dataset_format.kind} record",
            converts,
        ),
        Check(
            "dataset format",
            dataset_format,
            "matches no record that lacks one of its columns",
            detects_only_complete_records,
        ),
    ]


def sample_record(dataset_format: DatasetFormat) -> dict[str, Any]:
    record = {column: SAMPLE_VALUES.get(column, TEXT) for column in dataset_format.columns}
    if dataset_format.kind in PROMPTED:
        record.setdefault("prompt", SAMPLE_VALUES["prompt"])
    return record


def converts(dataset_format: DatasetFormat, workspace: Workspace) -> None:
    if dataset_format.kind not in get_args(DatasetKind):
        raise Broken(f"its kind {dataset_format.kind!r} is none of {', '.join(get_args(DatasetKind))}")
    record = sample_record(dataset_format)
    try:
        converted = dataset_format.convert(dict(record))
    except ValueError as error:
        raise Skip(f"it refuses the kit's sample record {record} ({error}), so its output cannot be checked") from None
    problem = canonical_problem(dataset_format.kind, converted)
    if problem:
        raise Broken(f"convert returned no canonical {dataset_format.kind} record: {problem}")


def canonical_problem(kind: str, record: Any) -> str | None:
    """What is wrong with a canonical record of ``kind`` (``builtin/data_formats.py``
    documents each), or None."""
    from modelloop.data.messages import check_messages

    if not isinstance(record, Mapping):
        return f"it is a {type(record).__name__}, not a mapping"
    try:
        if kind == "text":
            if not isinstance(record.get("text"), str) or not record["text"]:
                return "text must be a non-empty string"
        elif kind == "conversation":
            check_messages(record.get("messages"))
        else:
            prompt = check_messages(record.get("prompt"), ends_with="prompt", field_name="prompt")
            answers = {"preference": ("chosen", "rejected"), "kto": ("completion",), "prompt": ()}[kind]
            for answer in answers:
                if not isinstance(record.get(answer), Sequence) or isinstance(record.get(answer), str):
                    return f"{answer} must be a list of messages"
                check_messages([*prompt, *record[answer]], field_name=answer)
            if kind == "kto" and not isinstance(record.get("label"), bool):
                return "label must be true or false"
    except ValueError as error:
        return str(error)
    return None


def detects_only_complete_records(dataset_format: DatasetFormat, workspace: Workspace) -> None:
    record = sample_record(dataset_format)
    for column in dataset_format.columns:
        if dataset_format.matches({key: value for key, value in record.items() if key != column}):
            raise Broken(
                f"it matches a record without its column {column!r}: "
                "detection would choose it for data the kernel then refuses"
            )
