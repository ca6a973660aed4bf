"""``eval``: run a data set's prompts through an engine and score the answers.

Metrics are rewards (``accuracy``, ``exact``, or ``reward:NAME`` for any registered
reward, with its options: a reward model's ``path``), so what GRPO optimises can be
measured the same way. The eval run folder holds
``results.jsonl`` (each prompt, answer, reference and score) and a manifest with the
summary; when the model is a run folder, the summary is also added to that run's
manifest under ``evaluations``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelloop.artifacts import is_run, new_run_dir, read_manifest, run_id, sha256_path, update_manifest
from modelloop.config import ConfigError
from modelloop.data.records import read_records
from modelloop.data.tokenize import problems_error
from modelloop.inference.batch import prompts_from, run_inference
from modelloop.inference.choice import find_engine
from modelloop.inference.types import SamplingParams
from modelloop.lifecycle import stage_lifecycle
from modelloop.rewards import BoundReward, RewardError, bind


def resolve_metrics(names: list[str], options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, BoundReward]:
    """``accuracy``, ``exact`` or ``reward:NAME`` -> the rewards that score them, with the
    ``options`` given for each (by the reward's name: ``{"reward-model": {"path": RUN}}``)."""
    rewards = {name: name.split(":", 1)[1] if name.startswith("reward:") else name for name in names}
    stray = sorted(set(options or {}) - set(rewards.values()))
    if stray:
        raise RewardError(f"options for {stray[0]!r}, which is not one of the metrics ({', '.join(names)})")
    return {name: bind(reward, (options or {}).get(reward, {})) for name, reward in rewards.items()}


def new_eval_run(model: str, config: dict[str, Any], output_dir: Path | None) -> Path:
    """An eval run folder whose manifest says it is running, and which run it evaluates."""
    run_dir = new_run_dir("eval", output_dir)
    update_manifest(
        run_dir,
        id=run_id(run_dir),
        stage="eval",
        status="running",
        parent=read_manifest(model).get("id") if is_run(model) else None,
        config=config,
    )
    return run_dir


def evaluate(
    model: str,
    data: str | Path,
    *,
    metrics: list[str],
    engine: str = "hf",
    output_dir: Path | None = None,
    max_tokens: int = 64,
    batch_size: int = 16,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Score ``model``'s greedy answers to every prompt of ``data``; returns the summary."""
    scorers = resolve_metrics(metrics, metric_options)
    chosen = find_engine(engine)
    records = read_records([data])
    if records.problems:
        raise problems_error(records.problems, "Fix them before evaluating.")
    prompts = prompts_from(records.examples)
    missing = [p.location for p in prompts if p.reference is None]
    if missing and any("solution" in reward.columns for reward in scorers.values()):
        raise ConfigError(
            f"{missing[0]}: no reference answer to score against (a final assistant turn or a 'solution' column)"
        )
    config = {
        "model": model,
        "data": str(data),
        "metrics": metrics,
        **({"metric_options": metric_options} if metric_options else {}),
        "engine": chosen.name,
        "max_tokens": max_tokens,
    }
    run_dir = new_eval_run(model, config, output_dir)
    with stage_lifecycle("eval", config, run_dir) as context:
        session = chosen.start(model, options={"served_name": "model"})
        try:
            started = time.perf_counter()
            rows = run_inference(
                session,
                prompts,
                run_dir / "results.jsonl",
                SamplingParams(max_tokens=max_tokens, temperature=0),
                batch_size=batch_size,
            )
            seconds = time.perf_counter() - started
        finally:
            session.close()
        summary: dict[str, float] = {}
        for name, reward in scorers.items():
            extra: dict[str, list[Any]] = {}
            for row in rows:
                for key, value in row.get("columns", {}).items():
                    extra.setdefault(key, []).append(value)
            extra["solution"] = [row["reference"] for row in rows]
            scores = reward.score([row["prompt"] for row in rows], [row["response"] for row in rows], **extra)
            for row, score in zip(rows, scores):
                row.setdefault("scores", {})[name] = float(score)
            summary[name] = sum(scores) / len(scores)
        (run_dir / "scored.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        summary["examples"] = len(rows)
        summary["seconds"] = round(seconds, 3)
        update_manifest(
            run_dir, status="completed", metrics=summary, data={"file": str(data), "sha256": sha256_path(Path(data))}
        )
        if is_run(model):
            evaluations = read_manifest(model).get("evaluations", {})
            evaluations[str(data)] = {**summary, "run": run_id(run_dir)}
            update_manifest(Path(model), evaluations=evaluations)
        context.result.update(summary=summary, run_dir=str(run_dir))
    return {"run_dir": str(run_dir), "summary": summary}
