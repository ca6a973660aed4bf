"""Training data made of a served model's logged answers and what its users thought of
them (``modelloop data from-logs``; the log: ``modelloop.inference.request_log``).

- ``sft``: the answers users liked (rated up, or scored at least ``threshold``) and the
  corrected answers, each after its conversation: ``{"messages": [...]}``;
- ``kto``: every judged answer labelled liked (true) or not (false), and each correction
  as a liked answer, the answer it corrects as a disliked one;
- ``preference``: each correction chosen over the answer it corrects, and, for a
  conversation answered more than once, each liked answer chosen over each disliked one.

An answer is judged by the latest feedback that rates or scores it, and corrected by the
latest correction. Only chat requests make data (a raw completion has no conversation to
train on), and an empty answer (the model ended its turn at once) is no assistant turn to
train on or against: only its correction is used. Each record is written once; what was
left out, and why, is counted.

Beside the data goes ``<file>.origin.json``: the log, the runs whose answers it holds.
A stage trained on the file records it in its manifest (``data.origins``), so the
lineage leads from the new run back to the run that was served.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelloop.artifacts import atomic_file, write_json_atomic
from modelloop.errors import ModelloopError
from modelloop.inference.request_log import log_files, read_log
from modelloop.jsonl import write_record

Kind = Literal["sft", "kto", "preference"]
ORIGIN_SUFFIX = ".origin.json"


@dataclass
class Answer:
    """One logged answer and what its users thought of it."""

    request: Mapping[str, Any]
    text: str
    liked: bool | None = None  # None: not judged
    correction: str | None = None

    @property
    def conversation(self) -> list[Any]:
        return list(self.request["messages"])


@dataclass
class Made:
    """The records made, where their answers came from, and what was left out and why."""

    records: list[dict[str, Any]] = field(default_factory=list)
    runs: set[str] = field(default_factory=set)
    sources: set[str] = field(default_factory=set)
    left_out: Counter[str] = field(default_factory=Counter)


def collect(folder: str | Path, *, threshold: float = 0.5) -> tuple[list[Answer], Counter[str]]:
    """Every logged chat answer with its feedback, oldest first; and what was left out."""
    if not Path(folder).is_dir():
        raise ModelloopError(f"{folder}: no such request log (a folder `serve --log DIR` wrote)")
    if not log_files(folder):
        raise ModelloopError(f"{folder}: holds no request log files (requests-*.jsonl, from `serve --log`)")
    answers: dict[tuple[str, int], Answer] = {}
    left_out: Counter[str] = Counter()
    for entry in read_log(folder):
        if entry.get("type") == "request":
            if entry.get("kind") != "chat":
                left_out["raw completions (no conversation)"] += 1
                continue
            for index, answer in enumerate(entry.get("answers") or []):
                answers[(entry["id"], index)] = Answer(entry, answer["text"])
        elif entry.get("type") == "feedback":
            answer = answers.get((entry.get("id"), entry.get("index", 0)))
            if answer is None:
                left_out["feedback on no logged chat answer"] += 1
                continue
            if "rating" in entry:
                answer.liked = entry["rating"] == "up"
            elif "score" in entry:
                answer.liked = entry["score"] >= threshold
            if "correction" in entry:
                answer.correction = entry["correction"]
    return list(answers.values()), left_out


def make(answers: Sequence[Answer], kind: Kind) -> Made:
    """The records of ``kind`` the answers make, each once."""
    made = Made()
    seen: set[str] = set()
    for answer, record in _records(answers, kind, made.left_out):
        key = json.dumps(record, sort_keys=True, ensure_ascii=False)
        if key in seen:
            made.left_out["repeated records"] += 1
            continue
        seen.add(key)
        made.records.append(record)
        if answer.request.get("source"):
            made.sources.add(str(answer.request["source"]))
        if answer.request.get("run"):
            made.runs.add(str(answer.request["run"]))
    return made


def _records(answers: Sequence[Answer], kind: Kind, left_out: Counter[str]) -> Iterator[tuple[Answer, dict[str, Any]]]:
    if kind == "preference":
        yield from _pairs(answers, left_out)
        return
    for answer in answers:
        if answer.liked is None and answer.correction is None:
            left_out["answers nobody judged"] += 1
            continue
        if kind == "sft":
            if answer.correction is not None:
                yield answer, {"messages": [*answer.conversation, _assistant(answer.correction)]}
            elif not answer.liked:
                left_out["disliked answers (sft keeps the good ones)"] += 1
            elif _empty(answer, left_out):
                continue
            else:
                yield answer, {"messages": [*answer.conversation, _assistant(answer.text)]}
        else:
            if answer.correction is not None:
                yield answer, _kto(answer, answer.correction, True)
            if _empty(answer, left_out):
                continue
            yield answer, _kto(answer, answer.text, answer.correction is None and bool(answer.liked))


def _pairs(answers: Sequence[Answer], left_out: Counter[str]) -> Iterator[tuple[Answer, dict[str, Any]]]:
    """Corrections over what they correct; liked over disliked answers to one conversation."""
    by_conversation: dict[str, list[Answer]] = {}
    for answer in answers:
        if answer.liked is None and answer.correction is None:
            left_out["answers nobody judged"] += 1
        elif _empty(answer, left_out):
            continue
        elif answer.correction is not None and answer.correction != answer.text:
            yield answer, _preference(answer, answer.correction, answer.text)
        elif answer.liked is not None:
            key = json.dumps(answer.conversation, sort_keys=True, ensure_ascii=False)
            by_conversation.setdefault(key, []).append(answer)
    for group in by_conversation.values():
        liked = [answer for answer in group if answer.liked]
        disliked = [answer for answer in group if not answer.liked]
        if not liked or not disliked:
            left_out["judged answers with no opposite to pair with"] += len(group)
        for good in liked:
            for bad in disliked:
                if good.text != bad.text:
                    yield good, _preference(good, good.text, bad.text)


def _empty(answer: Answer, left_out: Counter[str]) -> bool:
    """Whether the answer is empty (counted as left out)."""
    if answer.text.strip():
        return False
    left_out["empty answers"] += 1
    return True


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _kto(answer: Answer, text: str, label: bool) -> dict[str, Any]:
    return {"prompt": answer.conversation, "completion": [_assistant(text)], "label": label}


def _preference(answer: Answer, chosen: str, rejected: str) -> dict[str, Any]:
    return {"prompt": answer.conversation, "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)]}


def write(made: Made, out: Path, *, log: Path, kind: Kind) -> Path:
    """The records as JSONL at ``out`` and their origin beside it; the origin's path."""
    if not made.records:
        reasons = ", ".join(f"{count} {why}" for why, count in made.left_out.most_common()) or "an empty log"
        raise ModelloopError(f"{log}: no {kind} records in it ({reasons}); nothing written")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as handle:
        for record in made.records:
            write_record(handle, record)
    origin = origin_path(out)
    write_json_atomic(
        origin,
        {
            "made_by": "modelloop data from-logs",
            "log": str(log.resolve()),
            "as": kind,
            "records": len(made.records),
            "runs": sorted(made.runs),
            "sources": sorted(made.sources),
            "left_out": dict(made.left_out),
        },
    )
    return origin


def origin_path(data: Path) -> Path:
    return data.with_name(data.name + ORIGIN_SUFFIX)


def read_origin(data: Path) -> dict[str, Any] | None:
    """Where a data file came from, when ``data from-logs`` made it."""
    path = origin_path(data)
    return json.loads(path.read_text()) if path.is_file() else None
