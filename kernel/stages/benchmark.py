"""``eval --benchmark``: standard tasks through an evaluation back end (lm-eval, EvalScope).

Where the answers come from is the kernel's choice, the same for every back end: the model
loaded in this process (the default, where the back end can take it), an engine started
for the evaluation and put behind the OpenAI API (``engine``), or a server already running
(``endpoint``: ``modelloop serve``, vLLM, SGLang, llama.cpp). The eval run folder keeps the
back end's per-example output and ``benchmarks.json``; the scores also go into the
evaluated run's manifest under ``benchmarks``, where ``modelloop runs`` and ``runs diff``
read them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloop.artifacts import is_run, read_manifest, run_id, update_manifest
from modelloop.benchmarks import BenchmarkJob, Endpoint, InProcess, TaskScores
from modelloop.config import ConfigError
from modelloop.errors import require_libraries
from modelloop.inference.choice import find_engine
from modelloop.lifecycle import stage_lifecycle
from modelloop.registry import EVAL_BACKENDS, get_registry
from modelloop.specs import EvalBackend
from modelloop.stages.evaluate import new_eval_run


def resolve_backend(name: str, options: Mapping[str, Any] | None) -> tuple[EvalBackend, dict[str, Any]]:
    """The back end and its checked options; fails before any model loads."""
    backend = get_registry(EVAL_BACKENDS).get(name)
    require_libraries(backend, "eval backend")
    try:
        checked = dict(backend.check(dict(options or {})) if backend.check is not None else options or {})
    except ValueError as error:
        raise ConfigError(f"{backend.name} eval backend: {error}") from None
    return backend, checked


@dataclass(frozen=True)
class AnswersFrom:
    """Where the answers come from: nothing set, the model in this process (where the back
    end can take it, else the ``hf`` engine behind the built-in server); ``engine``, that
    engine started for the evaluation, behind the OpenAI API; ``endpoint``, a server
    already running (``served_name``: the name it serves the model under, when several)."""

    engine: str | None = None
    endpoint: str | None = None
    served_name: str | None = None
    api_key: str | None = None


def benchmark(
    model: str,
    tasks: Sequence[str],
    *,
    backend: str = "lm-eval",
    answers: AnswersFrom = AnswersFrom(),
    limit: int | None = None,
    task_dirs: Sequence[str | Path] = (),
    options: Mapping[str, Any] | None = None,
    output_dir: Path | None = None,
) -> dict[str, Any]:
    """Run ``tasks`` on ``model`` (with an endpoint: what it serves, for the record and the
    tokenizer); returns the eval run folder and ``{"TASK.METRIC": score}``."""
    tasks = tuple(dict.fromkeys(task.strip() for task in tasks if task.strip()))
    if not tasks:
        raise ConfigError("benchmarks: name at least one task")
    if answers.engine and answers.endpoint:
        raise ConfigError("give an engine to start, or the endpoint of one already running, not both")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of examples per task, got {limit}")
    chosen, checked = resolve_backend(backend, options)
    folders = tuple(Path(folder) for folder in task_dirs)
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(f"tasks folder {folder} does not exist")
    config = {
        "model": model,
        "benchmarks": list(tasks),
        "backend": chosen.name,
        "engine": answers.engine,
        "endpoint": answers.endpoint,
        "limit": limit,
        "task_dirs": [str(folder) for folder in folders],
        "options": checked,
    }
    run_dir = new_eval_run(model, config, output_dir)
    with stage_lifecycle("eval", config, run_dir) as context:
        started = time.perf_counter()
        try:
            with _target(model, chosen, answers) as target:
                job = BenchmarkJob(
                    tasks=tasks,
                    target=target,
                    limit=limit,
                    task_dirs=folders,
                    output_dir=run_dir / "benchmarks",
                    options=checked,
                )
                job.output_dir.mkdir(exist_ok=True)
                scores: list[TaskScores] = list(chosen.evaluate(job))
        except BaseException as error:
            update_manifest(run_dir, status="failed", error=f"{type(error).__name__}: {error}")
            raise
        seconds = round(time.perf_counter() - started, 3)
        flat = {name: value for task in scores for name, value in task.flat().items()}
        detail = {
            f"{chosen.name}:{task.task}": {"metrics": dict(task.metrics), "examples": task.examples, "limit": limit}
            for task in scores
        }
        (run_dir / "benchmarks.json").write_text(json.dumps(detail, indent=2) + "\n")
        update_manifest(run_dir, status="completed", metrics=flat, benchmarks=detail, seconds=seconds)
        if is_run(model):
            recorded = read_manifest(model).get("benchmarks", {})
            recorded.update({key: {**entry, "run": run_id(run_dir)} for key, entry in detail.items()})
            update_manifest(Path(model), benchmarks=recorded)
        context.result.update(summary=flat, run_dir=str(run_dir))
    return {"run_dir": str(run_dir), "summary": flat, "benchmarks": detail}


@contextmanager
def _target(model: str, backend: EvalBackend, answers: AnswersFrom) -> Iterator[InProcess | Endpoint]:
    if answers.endpoint is not None:
        yield Endpoint(
            url=answers.endpoint.rstrip("/"),
            model=answers.served_name or _only_served_model(answers.endpoint, answers.api_key),
            tokenizer=_tokenizer_of(model),
            api_key=answers.api_key,
        )
        return
    if answers.engine is None and backend.in_process:
        from modelloop.models.loading import inference_device_map, load_model, merged_model

        loaded = load_model(model, device_map=inference_device_map())
        yield InProcess(model=merged_model(loaded).eval(), tokenizer=loaded.tokenizer, path=model)
        return
    from modelloop.inference.serving import openai_url

    engine = find_engine(answers.engine or "hf")
    session = engine.start(model, options={"served_name": answers.served_name or "model"})
    try:
        with openai_url(session) as url:
            yield Endpoint(
                url=url,
                model=getattr(session, "default_model", None) or session.models[0],
                tokenizer=_tokenizer_of(model),
            )
    finally:
        session.close()


def _tokenizer_of(model: str) -> str | None:
    """The local folder of ``model``'s tokenizer; None for a name only the server knows."""
    from modelloop.errors import ModelloopError
    from modelloop.models.loading import resolve_model_source

    try:
        return resolve_model_source(model, weights=False).tokenizer
    except ModelloopError:
        return None


def _only_served_model(endpoint: str, api_key: str | None) -> str:
    """The one model a server serves; with several, the user must say which."""
    import httpx

    from modelloop.errors import EngineError

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{endpoint.rstrip('/')}/models", headers=headers, timeout=30)
        response.raise_for_status()
        served = [entry["id"] for entry in response.json()["data"]]
    except (httpx.HTTPError, KeyError, TypeError, ValueError) as error:
        raise EngineError(f"{endpoint}: cannot list the served models ({error})") from None
    if len(served) != 1:
        raise ConfigError(f"{endpoint} serves {', '.join(served) or 'no model'}: name one with --served-name")
    return served[0]
