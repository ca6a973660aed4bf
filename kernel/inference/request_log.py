"""What a served model was asked and answered, and what its users thought of it
(``serve --log DIR``): the JSON Lines the next round's training data is made of
(``modelloop data from-logs``, ``modelloop.data.from_logs``).

Each answered request is a line ``{"type": "request", "id", "time", "model", "source",
"run", "kind", "messages" | "prompt", "answers": [{"text", "finish_reason"}], "sampling",
"latency_s", "prompt_tokens", "completion_tokens", "stream"}``, its ``id`` the one its
answer carried; each ``POST /v1/feedback`` is a line ``{"type": "feedback", "id", "time",
"index", "rating"?, "score"?, "correction"?, "comment"?}`` about the request of that id.

Lines are written by a thread of their own, so that no request waits for the disk. Each
server start begins a file of its own (``requests-<time>-<pid>-<n>.jsonl``), and a file
that has reached ``max_bytes`` is closed and the next begun. A server killed mid-write
leaves a last line cut short, which readers leave out (``modelloop.jsonl``).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from modelloop.errors import ModelloopError
from modelloop.jsonl import read_jsonl, write_record

#: A log file is closed, and the next begun, once it holds this many bytes.
DEFAULT_MAX_BYTES = 64 << 20
PATTERN = "requests-*.jsonl"


class RequestLog:
    """Appends requests and feedback to the log folder from a background thread.

    The ids of the requests logged (before, in the folder, and since) are kept, so that
    feedback about a request the log does not hold is refused when it is given.
    """

    def __init__(self, folder: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ModelloopError(f"{self.folder}: the request log is a folder, and this is a file")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._ids = {entry["id"] for entry in read_log(self.folder) if entry.get("type") == "request"}
        self._lines: queue.SimpleQueue[Mapping[str, Any] | None] = queue.SimpleQueue()
        self._stem = f"requests-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self._files = 0
        self._thread = threading.Thread(target=self._write, name="modelloop-request-log", daemon=True)
        self._thread.start()

    def knows(self, request_id: str) -> bool:
        """Whether a request of this id was logged."""
        return request_id in self._ids

    def request(self, entry: Mapping[str, Any]) -> None:
        """Log an answered request (its feedback is accepted from now on)."""
        self._ids.add(entry["id"])
        self._lines.put({"type": "request", "time": _now(), **entry})

    def feedback(self, entry: Mapping[str, Any]) -> None:
        """Log what a user thought of a logged request's answer."""
        self._lines.put({"type": "feedback", "time": _now(), **entry})

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        self._lines.put(None)
        self._thread.join(timeout=30)

    def _write(self) -> None:
        out: IO[str] | None = None
        try:
            while (entry := self._lines.get()) is not None:
                if out is None or out.tell() >= self.max_bytes:
                    out = self._next_file(out)
                write_record(out, entry)
                if self._lines.empty():  # a burst is written through at its end
                    out.flush()
        finally:
            if out is not None:
                out.close()

    def _next_file(self, current: IO[str] | None) -> IO[str]:
        if current is not None:
            current.close()
        self._files += 1
        return (self.folder / f"{self._stem}-{self._files:04d}.jsonl").open("a", encoding="utf-8")


def log_files(folder: str | Path) -> list[Path]:
    """The log's files, oldest first."""
    return sorted(Path(folder).glob(PATTERN))


def read_log(folder: str | Path) -> Iterator[dict[str, Any]]:
    """Every complete line of the log, oldest file first."""
    for path in log_files(folder):
        yield from read_jsonl(path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
