"""Offline inference over a data file, written so that a killed run resumes where it stopped.

Every record of any format becomes a prompt (a conversation's last assistant turn, a
prompt record's ``solution``, becomes the reference answer). Results are appended to a
JSONL file batch by batch and flushed; a rerun skips the rows already there (and cuts off a
last line cut short by a kill, ``modelloop.jsonl``), so every row is written exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloop.data.media import COLUMNS, as_content_parts, inline_media
from modelloop.data.records import Example
from modelloop.data.sources import DataError
from modelloop.inference.types import GenerationRequest, SamplingParams
from modelloop.jsonl import read_jsonl, repair, write_record


@dataclass(frozen=True)
class Prompt:
    index: int
    location: str
    messages: list[dict[str, Any]] | None
    text: str | None
    reference: str | None
    columns: dict[str, Any]


def prompts_from(examples: Sequence[Example]) -> list[Prompt]:
    """What to ask the model for each record, and the answer it should give if known
    (a record's pictures and clips as image and audio parts of the messages)."""
    prompts = []
    for index, example in enumerate(examples):
        record = example.record
        if example.kind == "conversation":
            messages = as_content_parts(record["messages"], record)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = Prompt(index, example.location, messages[:last], None, messages[last]["content"], {})
        elif example.kind == "text":
            prompt = Prompt(index, example.location, None, record["text"], None, {})
        else:
            columns = {
                k: v
                for k, v in record.items()
                if k not in ("prompt", "chosen", "rejected", "completion", "label", *COLUMNS)
            }
            reference = columns.get("solution")
            messages = as_content_parts(record["prompt"], record)
            prompt = Prompt(
                index, example.location, messages, None, None if reference is None else str(reference), columns
            )
        prompts.append(prompt)
    return prompts


def run_inference(
    session: Any,
    prompts: Sequence[Prompt],
    output: Path,
    params: SamplingParams,
    *,
    model: str | None = None,
    batch_size: int = 16,
    progress: Callable[[int], None] = lambda count: None,
) -> list[dict[str, Any]]:
    """Generate for every prompt not yet in ``output``; returns all rows, in index order."""
    if not prompts:
        raise DataError("no prompts to run")
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {row["index"] for row in repair(output)}
    todo = [prompt for prompt in prompts if prompt.index not in done]
    progress(len(prompts) - len(todo))
    with output.open("a", encoding="utf-8") as out:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            requests = [
                GenerationRequest(
                    messages=inline_media(p.messages) if p.messages is not None else None,
                    prompt=p.text,
                    model=model,
                    params=params,
                )
                for p in batch
            ]
            for prompt, generation in zip(batch, session.generate(requests)):
                choice = generation.choices[0]
                row = {
                    "index": prompt.index,
                    "source": prompt.location,
                    "prompt": prompt.messages if prompt.messages is not None else prompt.text,
                    "response": choice.text,
                    "finish_reason": choice.finish_reason,
                    "reference": prompt.reference,
                    **({"columns": prompt.columns} if prompt.columns else {}),
                }
                write_record(out, row)
            out.flush()
            os.fsync(out.fileno())
            progress(len(batch))
    return read_rows(output)


def read_rows(output: Path) -> list[dict[str, Any]]:
    return sorted(read_jsonl(output), key=lambda row: row["index"])
