"""Simulated users: a served model asked every prompt of a data file over the OpenAI API,
each answer judged by metrics standing in for its users, the judgement sent back as
feedback, and the request log turned into training data (``modelloop data from-logs``).

Everything but the users is the loop's real part: a ``modelloop serve --log`` process,
the HTTP API, the feedback route, the log and ``from-logs``. A recipe's ``feedback`` stage
runs it (``examples/feedback-loop.yaml``); a later stage trains on its data with
``data_from:``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from modelloop.artifacts import is_run, read_manifest, run_id, update_manifest
from modelloop.data.from_logs import Kind, collect, make, write
from modelloop.data.records import read_records
from modelloop.data.tokenize import problems_error
from modelloop.errors import ModelloopError
from modelloop.inference.batch import Prompt, prompts_from
from modelloop.stages.evaluate import resolve_metrics

#: The data file a feedback stage writes in its run folder.
DATA_FILE = "feedback.jsonl"


def simulate_users(
    model: str,
    data: str,
    out: Path,
    *,
    metrics: Sequence[str] = ("accuracy",),
    threshold: float = 0.5,
    kind: Kind = "kto",
    samples: int = 2,
    temperature: float = 1.0,
    max_tokens: int = 16,
    engine: str = "hf",
    seed: int = 0,
    clients: int = 8,
    startup_timeout: float = 300.0,
) -> dict[str, Any]:
    """Serve ``model`` with a request log in ``out/log``, ask it every prompt of ``data``
    (``samples`` answers each, sampled with the seed ``seed`` plus the prompt's number),
    rate each answer up when every metric scores it at least ``threshold``, and write the
    log as ``kind`` data to ``out/feedback.jsonl``."""
    import httpx

    from modelloop.inference.remote import ServerProcess
    from modelloop.parallel.world import free_port

    scorers = resolve_metrics(list(metrics))
    records = read_records([data])
    if records.problems:
        raise problems_error(records.problems, "Fix them before asking the model.")
    prompts = [prompt for prompt in prompts_from(records.examples) if prompt.messages is not None]
    if not prompts:
        raise ModelloopError(f"{data}: no chat prompts to ask (prompt or conversation records)")
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "modelloop", "serve", model, "--engine", engine, "--port", str(port)]
    command += ["--served-name", "model", "--log", str(out / "log")]
    server = ServerProcess(command, url=f"http://127.0.0.1:{port}", name=f"modelloop serve ({engine})")
    sampling = {"model": "model", "n": samples, "temperature": temperature, "max_tokens": max_tokens}
    try:
        server.wait_healthy(startup_timeout)
        with httpx.Client(base_url=f"{server.url}/v1", timeout=startup_timeout) as client:

            def user(prompt: Prompt) -> list[bool]:
                request = {**sampling, "messages": prompt.messages, "seed": seed + prompt.index}
                answer = client.post("/chat/completions", json=request)
                answer.raise_for_status()
                body = answer.json()
                liked = []
                for choice in body["choices"]:
                    good = all(
                        _score(scorer, prompt, choice["message"]["content"]) >= threshold for scorer in scorers.values()
                    )
                    rating = {"id": body["id"], "index": choice["index"], "rating": "up" if good else "down"}
                    client.post("/feedback", json=rating).raise_for_status()
                    liked.append(good)
                return liked

            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                judged = [good for liked in pool.map(user, prompts) for good in liked]
            seconds = time.perf_counter() - started
    finally:
        server.stop(grace=30)
    answers, left_out = collect(out / "log", threshold=threshold)
    made = make(answers, kind)
    made.left_out.update(left_out)
    write(made, out / DATA_FILE, log=out / "log", kind=kind)
    summary = {
        "answers": len(judged),
        "liked": round(sum(judged) / len(judged), 4),
        "records": len(made.records),
        "seconds": round(seconds, 3),
    }
    update_manifest(
        out,
        id=run_id(out),
        stage="feedback",
        status="completed",
        parent=read_manifest(model).get("id") if is_run(model) else None,
        config={"model": model, "data": data, "metrics": list(metrics), "as": kind, "samples": samples, "seed": seed},
        metrics=summary,
        data={"file": str(out / DATA_FILE), "log": str(out / "log")},
    )
    print(
        f"modelloop: simulated users liked {summary['liked']:.0%} of {len(judged)} answers; "
        f"{len(made.records)} {kind} records in {out / DATA_FILE}"
    )
    return summary


def _score(scorer: Any, prompt: Prompt, text: str) -> float:
    columns = {key: [value] for key, value in prompt.columns.items()}
    columns["solution"] = [prompt.reference]
    return float(scorer.score([prompt.messages], [[{"role": "assistant", "content": text}]], **columns)[0])
