"""Requests on their way through an engine's worker thread: where each one's deltas and
result go, and how the caller waits for them or reads them as they come.

An in-process engine whose one worker owns the model (the built-in ``hf``, llama.cpp)
queues an ``EngineJob`` per request; the worker answers it (``finish``) or hands it a
failure (``fail``), and ``generate``/``stream`` wait with ``job_results``/``job_deltas``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from modelloop.inference.types import Delta, Generation, GenerationRequest

_END = object()  # the last item of a job's deltas


@dataclass(eq=False)
class EngineJob:
    """One request in an engine's worker: its prompt, and where its deltas and result go."""

    request: GenerationRequest
    prompt_ids: list[int]
    streamed: bool = False  # someone reads the deltas as they come (else only the result)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the reader went away
    deltas: queue.Queue = field(default_factory=queue.Queue)
    result: Generation | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, result: Generation) -> None:
        """Answer the request (its streamed deltas, if any, were sent before)."""
        self.result = result
        self.deltas.put(_END)
        self.done.set()

    def fail(self, error: BaseException) -> None:
        """Hand the request a failure, unless it was answered already."""
        if not self.done.is_set():
            self.error = error
            self.deltas.put(_END)
            self.done.set()


def job_results(jobs: Sequence[EngineJob]) -> list[Generation]:
    """Wait for every job; the first failure is raised."""
    for job in jobs:
        job.done.wait()
    for job in jobs:
        if job.error is not None:
            raise job.error
    return [job.result for job in jobs]  # type: ignore[misc]


def job_deltas(job: EngineJob) -> Iterator[Delta]:
    """The job's deltas as the worker sends them; closing the iterator early (a client that
    went away) cancels the job, which the worker ends at its next token."""
    try:
        while (item := job.deltas.get()) is not _END:
            yield item
    finally:
        if not job.done.is_set():
            job.cancelled.set()
    if job.error is not None:
        raise job.error
