"""What an evaluation back end (lm-evaluation-harness, EvalScope, ...) is handed and gives back.

The kernel decides where the model answers from, and the back end only runs its tasks:
either a model loaded in this process (``InProcess``: the back end's own model wrapper
takes the already-loaded weights, adapters folded in), or an OpenAI-compatible endpoint
(``Endpoint``: a running ``modelloop serve``, vLLM, SGLang, ...). Scores come back per task
under the task's own metric names, so the numbers are the harness's, not modelloop's.

Torch-free on purpose: a back end that runs in another Python environment only needs
these types on this side.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, kw_only=True)
class InProcess:
    """A model loaded in this process.

    :param model: the transformers model (an adapter run's adapter folded in).
    :param tokenizer: its tokenizer, with the chat template it was trained with.
    :param path: what the user named (a run, a model folder, a hub id), for the record.
    """

    model: Any
    tokenizer: Any
    path: str


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """A model served over the OpenAI API.

    :param url: the API's base address, ending in ``/v1``.
    :param model: the served model name requests carry.
    :param tokenizer: a local folder holding the model's tokenizer, for back ends that
        count or cut tokens on the client side; None when unknown.
    :param api_key: the key the server asks for, or None.
    """

    url: str
    model: str
    tokenizer: str | None = None
    api_key: str | None = None


@dataclass(frozen=True, kw_only=True)
class BenchmarkJob:
    """One evaluation: which tasks, on which model, how many examples each.

    :param tasks: task names as the back end knows them (``gsm8k``, ``mmlu``, or a local
        task defined in one of ``task_dirs``).
    :param target: where the answers come from.
    :param limit: the first ``limit`` examples of each task; None for all.
    :param task_dirs: folders of task definitions in the back end's own format.
    :param output_dir: where the back end writes what it keeps (per-example answers).
    :param options: the back end's own options, already through its ``check``.
    """

    tasks: tuple[str, ...]
    target: InProcess | Endpoint
    limit: int | None = None
    task_dirs: tuple[Path, ...] = ()
    output_dir: Path
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class TaskScores:
    """One task's results: its metrics (the harness's names, no error bars) and how many
    examples were scored."""

    task: str
    metrics: Mapping[str, float]
    examples: int

    def flat(self) -> dict[str, float]:
        """``{"TASK.METRIC": value}``: the names recipe gates and ``runs diff`` use."""
        return {f"{self.task}.{metric}": value for metric, value in self.metrics.items()}


_NAME = re.compile(r"[^\w.-]+")


def metric_key(name: str) -> str:
    """A harness's metric name as a gate can name it: ``exact_match,strict-match`` ->
    ``exact_match.strict-match``, and ``acc,none`` -> ``acc`` (the unfiltered score)."""
    metric, _, filtered = name.partition(",")
    parts = [metric] if filtered in ("", "none") else [metric, filtered]
    return ".".join(_NAME.sub("_", part) for part in parts)
