"""ModelScope's EvalScope as a modelloop eval back end (``--backend evalscope``).

EvalScope pins ``modelscope[datasets]``, which holds ``datasets`` below 5 while modelloop's
stack needs 5, so it runs from its own Python environment (``python`` option, or
``MODELLOOP_EVALSCOPE_PYTHON``) and answers come over the OpenAI API: the kernel serves
the model for it (``in_process=False``), or it asks the endpoint given. Its two custom
benchmarks read the user's files: ``general_qa`` (``NAME.jsonl`` of ``query``/``response``)
and ``general_mcq`` (``NAME_val.jsonl`` of ``question``, ``A``..., ``answer``), from the
folder given with ``--tasks-dir``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelloop.plugin import EvalBackend, complete, hookimpl, positive

PLUGIN_API = ">=1.3,<2"  # the versions of modelloop.plugin this plugin is written against

PYTHON_VARIABLE = "MODELLOOP_EVALSCOPE_PYTHON"
DRIVER = Path(__file__).with_name("modelloop_evalscope_driver.py")
LOG_LINES = 20

DEFAULTS: dict[str, Any] = {
    "python": None,  # EvalScope's environment (default: $MODELLOOP_EVALSCOPE_PYTHON, else this Python)
    "max_tokens": 512,
    "concurrency": 8,  # requests in flight (EvalScope's eval_batch_size)
    "timeout": 600,  # seconds per request
    "dataset_args": {},  # EvalScope's own per-benchmark settings, over what modelloop sets
}

#: EvalScope's benchmarks over the user's own files, and the files of one subset.
CUSTOM = {"general_qa": ("*.jsonl", ""), "general_mcq": ("*_val.jsonl", "_val")}


def check(options: Mapping[str, Any]) -> dict[str, Any]:
    options = complete(options, DEFAULTS)
    for name in ("max_tokens", "concurrency"):
        positive(options, name)
    positive(options, "timeout", float)
    if not isinstance(options["dataset_args"], Mapping):
        raise ValueError(f"dataset_args must map benchmark names to settings, got {options['dataset_args']!r}")
    return {**options, "python": python_of(options)}


def python_of(options: Mapping[str, Any]) -> str:
    """The Python with EvalScope: as named, else this one where it has EvalScope; checked
    with the options, so that a missing environment is said before any model loads."""
    named = options["python"] or os.environ.get(PYTHON_VARIABLE)
    if named:
        if not Path(named).is_file():
            raise ValueError(f"EvalScope's Python {named} does not exist")
        return str(named)
    if importlib.util.find_spec("evalscope") is not None:
        return sys.executable
    raise ValueError(
        "EvalScope runs from its own Python environment (its modelscope pins datasets below 5): "
        "python -m venv .venv-evalscope && .venv-evalscope/bin/pip install evalscope, then set "
        f"{PYTHON_VARIABLE}=.venv-evalscope/bin/python or --backend-option python=..."
    )


def evaluate(job: Any) -> list[Any]:
    from modelloop.plugin import ModelloopError, TaskScores

    python = job.options["python"]
    work = job.output_dir
    config = {
        "model": job.target.model,
        "api_url": job.target.url,
        "api_key": job.target.api_key or "EMPTY",
        "eval_type": "openai_api",
        "dataset_args": _dataset_args(job),
        "generation_config": {"max_tokens": job.options["max_tokens"], "temperature": 0.0},
        "eval_batch_size": job.options["concurrency"],
        "timeout": job.options["timeout"],
        "limit": job.limit,
        "work_dir": str(work),
        "no_timestamp": True,
    }
    (work / "job.json").write_text(json.dumps({"tasks": list(job.tasks), "config": config}, indent=2))
    result = work / "result.json"
    log_path = work / "evalscope.log"
    print(
        f"modelloop: evalscope: {', '.join(job.tasks)} from {job.target.url}; progress in {log_path}", file=sys.stderr
    )
    with open(log_path, "w", encoding="utf-8") as log:
        exit_code = subprocess.run(
            [python, str(DRIVER), str(work / "job.json"), str(result)], stdout=log, stderr=subprocess.STDOUT
        ).returncode
    outcome = json.loads(result.read_text()) if result.is_file() else {}
    if exit_code != 0:
        raise ModelloopError(_failure(outcome, log_path))
    scores = []
    for task in job.tasks:
        report_path = next(work.glob(f"reports/**/{task}.json"))  # under the model's name, whatever it holds
        report = json.loads(report_path.read_text())
        reviews = work / "reviews" / report_path.parent.relative_to(work / "reports")
        scores.append(TaskScores(task=task, metrics=_metrics(report, reviews, task), examples=int(report["num"])))
    return scores


def _dataset_args(job: Any) -> dict[str, Any]:
    """Where the custom benchmarks' files are (the first tasks folder that has them),
    under what the user gave in ``dataset_args``."""
    from modelloop.plugin import ModelloopError

    found: dict[str, Any] = {}
    for task in job.tasks:
        if task not in CUSTOM:
            continue
        pattern, suffix = CUSTOM[task]
        for folder in job.task_dirs:
            subsets = sorted(path.name[: -len(".jsonl")].removesuffix(suffix) for path in folder.glob(pattern))
            if task == "general_qa":
                subsets = [name for name in subsets if not name.endswith(("_val", "_dev"))]
            if subsets:
                found[task] = {"local_path": str(folder), "subset_list": subsets}
                break
        else:
            raise ModelloopError(
                f"evalscope task {task!r} reads your own files ({pattern}): give their folder with --tasks-dir"
            )
    for task, settings in job.options["dataset_args"].items():
        found[task] = {**found.get(task, {}), **settings}
    return found


def _failure(outcome: Mapping[str, Any], log: Path) -> str:
    task, error = outcome.get("task"), outcome.get("error")
    if outcome.get("kind") == "unknown":
        return f"evalscope has no task {task!r}: {error}"
    if outcome.get("kind") == "network":
        return (
            f"evalscope task {task!r} needs its data from the network, which this machine cannot reach ({error}); "
            "fetch it once where ModelScope is reachable (it is then read from the cache), or use general_qa or "
            "general_mcq over local files with --tasks-dir"
        )
    if error:
        return f"evalscope task {task!r} failed: {error} (log: {log})"
    last = " | ".join(log.read_text(errors="replace").strip().splitlines()[-LOG_LINES:]) if log.is_file() else ""
    return f"EvalScope stopped before reporting ({log}): {last[-2000:]}"


def _metrics(report: Mapping[str, Any], reviews: Path, task: str) -> dict[str, float]:
    """Each of EvalScope's metrics for the task, named by its dimensions
    (``rouge.statistic_recall.variant_l``); a metric EvalScope could not compute for some
    example (a missing NLTK resource, say) is left out rather than reported as 0."""
    from modelloop.plugin import metric_key, warn_once

    broken = _unscored(reviews, task)
    scores = {}
    for metric in report["metrics"]:
        identity = metric["identity"]
        if identity["name"].lower() in broken:
            continue
        parts = [identity["name"], *(f"{key}_{value}" for key, value in sorted(identity["dimensions"].items()))]
        scores[".".join(metric_key(part) for part in parts)] = float(metric["score"])
    for name, why in broken.items():
        warn_once(f"evalscope task {task!r}: {name} not reported, EvalScope could not compute it ({why[:200]})")
    return scores


def _unscored(reviews: Path, task: str) -> dict[str, str]:
    """metric name (lower case) -> why EvalScope could not compute it for some example."""
    broken: dict[str, str] = {}
    for path in sorted(reviews.glob(f"{task}_*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            score = json.loads(line).get("sample_score", {}).get("score", {})
            for name, why in ((score.get("metadata") or {}).get("metric_errors") or {}).items():
                broken.setdefault(name.lower(), " ".join(str(why).split()))
    return broken


EVALSCOPE = EvalBackend(
    name="evalscope",
    description="ModelScope's EvalScope: its benchmarks and metrics, through the OpenAI API, from its own Python",
    evaluate=evaluate,
    check=check,
    in_process=False,
)


@hookimpl
def register_eval_backends(register):
    register(EVALSCOPE)
