"""EleutherAI's lm-evaluation-harness as a modelloop eval back end (``--backend lm-eval``).

Its own task definitions and metrics: a model in this process goes through its ``HFLM``
wrapper (the weights modelloop loaded, adapters folded in), an endpoint through its
``local-completions`` client, so vLLM, SGLang or ``modelloop serve`` answer the same tasks.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

from modelloop.plugin import EvalBackend, complete, hookimpl, positive

PLUGIN_API = ">=1.3,<2"  # the versions of modelloop.plugin this plugin is written against

GENERATE = "generate_until"  # the one kind of lm-eval task that only needs answers, not log-probabilities

DEFAULTS: dict[str, Any] = {
    "num_fewshot": None,  # the task's own
    "apply_chat_template": False,  # prompts as the task writes them, as published scores are made
    "batch_size": 8,  # in-process
    "num_concurrent": 8,  # requests in flight to an endpoint (its server batches them)
    "seed": 1234,
}


def check(options: Mapping[str, Any]) -> dict[str, Any]:
    options = complete(options, DEFAULTS)
    positive(options, "batch_size")
    positive(options, "num_concurrent")
    shots = options["num_fewshot"]
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
        raise ValueError(f"num_fewshot must be a whole number of examples, got {shots!r}")
    if not isinstance(options["apply_chat_template"], bool):
        raise ValueError(f"apply_chat_template must be true or false, got {options['apply_chat_template']!r}")
    return options


def evaluate(job: Any) -> list[Any]:
    import lm_eval

    from modelloop.plugin import Endpoint, TaskScores

    if not os.environ.get("LMEVAL_LOG_LEVEL"):  # its notes on task configs are not the user's business
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = _task_manager(job.tasks, job.task_dirs)
    # build each task first, so that a task that cannot load is named alone
    parts = {task: _load(manager, task) for task in job.tasks}
    if isinstance(job.target, Endpoint):
        scored = [leaf.config.task for leaves in parts.values() for leaf in leaves if leaf.OUTPUT_TYPE != GENERATE]
        if scored:
            _require_prompt_logprobs(job.target, scored[0])
    results = lm_eval.simple_evaluate(
        model=_model(job),
        tasks=list(job.tasks),
        task_manager=manager,
        limit=job.limit,
        num_fewshot=job.options["num_fewshot"],
        apply_chat_template=job.options["apply_chat_template"],
        log_samples=True,
        bootstrap_iters=0,  # no error bars: they cost minutes and nothing here reads them
        random_seed=job.options["seed"],
        numpy_random_seed=job.options["seed"],
        torch_random_seed=job.options["seed"],
        fewshot_random_seed=job.options["seed"],
    )
    scores = []
    for task, leaves in parts.items():
        samples = [sample for leaf in leaves for sample in results["samples"].get(leaf.config.task, [])]
        _write_samples(job.output_dir / f"{task}.jsonl", samples)
        scores.append(TaskScores(task=task, metrics=_metrics(results["results"][task]), examples=len(samples)))
    return scores


def _task_manager(tasks: Any, task_dirs: Any) -> Any:
    """The tasks' index: only the given folders when they define every task asked for
    (indexing lm-eval's own thousands of tasks takes seconds), else those folders and lm-eval's."""
    from modelloop.plugin import ModelloopError

    include = tuple(str(folder) for folder in task_dirs)
    if include:
        local = _index(include, defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = _index(include, defaults=True)
    for task in tasks:
        if task not in manager.all_tasks:
            import difflib

            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise ModelloopError(
                f"lm-eval has no task {task!r}{hint}: name one of its tasks (lm-eval ls tasks) or define it "
                "in a folder given with --tasks-dir"
            )
    return manager


@functools.cache
def _index(include: tuple[str, ...], *, defaults: bool) -> Any:
    """lm-eval's index of task definitions, built once per process for the same folders."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def _load(manager: Any, task: str) -> list[Any]:
    """The task (a group: its tasks, all levels down), with its data loaded."""
    from modelloop.plugin import ModelloopError

    try:
        return list(manager.load([task])["tasks"].values())
    except ConnectionError as error:  # datasets' offline and unreachable-hub errors both are
        raise ModelloopError(
            f"lm-eval task {task!r} needs its data from the network, which this machine cannot reach ({error}); "
            "fetch it once where the hub is reachable (it is then read from the cache), or define the task over "
            "local files with --tasks-dir"
        ) from None


def _require_prompt_logprobs(target: Any, task: str) -> None:
    """A task that scores answers by their log-probabilities asks the server for those of
    its prompt (``echo`` with ``logprobs``); refuse at once where the server gives none."""
    import httpx

    from modelloop.plugin import ModelloopError

    why = None
    if target.tokenizer is None:
        why = "and needs the model's tokenizer on this side: name the model's folder or run"
    else:
        body = {
            "model": target.model,
            "prompt": "1 2 3",
            "max_tokens": 1,
            "temperature": 0,
            "echo": True,
            "logprobs": 1,
        }
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        try:
            response = httpx.post(f"{target.url}/completions", json=body, headers=headers, timeout=60)
            given = response.json()["choices"][0]["logprobs"]["token_logprobs"] if response.is_success else []
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            given = []
        if not given or len(given) < 2:
            why = (
                f"which it asks {target.url} for (echo with logprobs), and that server gives none "
                "(vLLM and SGLang do; modelloop's built-in server does not): evaluate it in-process, without --engine"
            )
    if why:
        raise ModelloopError(f"lm-eval task {task!r} scores answers by their log-probabilities, {why}")


def _model(job: Any) -> Any:
    from modelloop.plugin import Endpoint

    target = job.target
    if not isinstance(target, Endpoint):
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=target.model, tokenizer=target.tokenizer, batch_size=job.options["batch_size"])
    from lm_eval.api.registry import get_model

    return get_model("local-completions")(
        base_url=f"{target.url}/completions",
        model=target.model,
        # loglikelihood tasks count tokens here; without a local tokenizer only generation tasks run
        tokenizer=target.tokenizer,
        tokenizer_backend="huggingface" if target.tokenizer else None,
        tokenized_requests=False,  # text prompts: every OpenAI server takes them
        num_concurrent=job.options["num_concurrent"],
        header={"Authorization": f"Bearer {target.api_key}"} if target.api_key else {},
        seed=job.options["seed"],
    )


def _metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The task's scores under gate-friendly names; error bars and bookkeeping left out."""
    from modelloop.plugin import metric_key

    return {
        metric_key(name): float(value)
        for name, value in row.items()
        if "," in name and "_stderr," not in name and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _write_samples(path: Any, samples: list[Mapping[str, Any]]) -> None:
    """Each example as lm-eval scored it: the document, the target, the answer, the scores."""
    import json

    keep = (
        "doc_id",
        "doc",
        "target",
        "filtered_resps",
        *{metric for sample in samples for metric in sample["metrics"]},
    )
    with open(path, "w", encoding="utf-8") as out:
        for sample in samples:
            row = {key: sample[key] for key in keep if key in sample}
            out.write(json.dumps(row, ensure_ascii=False, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    """numpy scalars and tuples of lm-eval's results as JSON."""
    return value.item() if hasattr(value, "item") else str(value)


LM_EVAL = EvalBackend(
    name="lm-eval",
    description="EleutherAI's lm-evaluation-harness: its tasks and metrics, in-process or through an endpoint",
    evaluate=evaluate,
    check=check,
    aliases=("lm-evaluation-harness",),
    requires=("lm_eval",),
)


@hookimpl
def register_eval_backends(register):
    register(LM_EVAL)
