"""``eval --benchmark`` as the kernel runs it for any evaluation back end (here a third-party
one, installed as a real distribution): where the answers come from, where the scores go
(the eval run, the evaluated run's manifest, ``runs``, ``runs diff``), and the recipe gates
that read them. The shipped back ends run real tasks in their own plugins' tests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from modelloop.artifacts import read_manifest
from modelloop.cli import build_cli
from modelloop.recipes import HeldBack, load_recipe, run_recipe
from modelloop.stages.benchmark import AnswersFrom, benchmark

RECORDER = """
import json

import modelloop
from modelloop.plugin import Endpoint, EvalBackend, TaskScores, complete


def check(options):
    return complete(options, {"shots": 0})


def evaluate(job):
    seen = {"tasks": list(job.tasks), "limit": job.limit, "options": dict(job.options)}
    seen["task_dirs"] = [str(folder) for folder in job.task_dirs]
    if isinstance(job.target, Endpoint):
        import httpx

        body = {"model": job.target.model, "prompt": "What is 1+1?", "max_tokens": 3, "temperature": 0}
        answer = httpx.post(f"{job.target.url}/completions", json=body, timeout=60).json()
        seen.update(where="endpoint", tokens=answer["usage"]["completion_tokens"], tokenizer=job.target.tokenizer)
    else:
        seen.update(where="in-process", adapter_folded=not hasattr(job.target.model, "peft_config"))
    (job.output_dir / "seen.json").write_text(json.dumps(seen))
    if job.options["shots"] < 0:
        raise RuntimeError("the harness broke")
    return [
        TaskScores(task=task, metrics={"acc": round(job.options["shots"] / 10 + position / 100, 4)}, examples=4)
        for position, task in enumerate(job.tasks)
    ]


@modelloop.hookimpl
def register_eval_backends(register):
    register(EvalBackend(name="recorder", evaluate=evaluate, check=check))
    register(EvalBackend(name="recorder-http", evaluate=evaluate, check=check, in_process=False))
"""


@pytest.fixture
def recorder(install_plugin, monkeypatch, tmp_path):
    dist = install_plugin("modelloop-plugin-recorder", RECORDER)
    monkeypatch.setenv("MODELLOOP_LOAD_PLUGINS", os.environ["MODELLOOP_LOAD_PLUGINS"] + "," + dist)
    monkeypatch.setenv("MODELLOOP_HOME", str(tmp_path / "home"))
    return dist


def run_copy(lora_run, tmp_path, name):
    """A copy of the LoRA run under the runs folder: evaluating it writes into its manifest."""
    copy = tmp_path / "home" / "runs" / name
    shutil.copytree(lora_run[0], copy)
    manifest = read_manifest(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "id": name}))
    return copy


def seen(result):
    """What the back end was handed, as it wrote it down."""
    return json.loads((Path(result["run_dir"]) / "benchmarks" / "seen.json").read_text())


def invoke(*args):
    return CliRunner().invoke(build_cli(), [str(arg) for arg in args])


def test_hook_register_eval_backends_scores_go_to_the_eval_run_and_the_evaluated_runs_manifest(
    recorder, lora_run, tmp_path
):
    run = run_copy(lora_run, tmp_path, "20260101-000000-sft")
    result = benchmark(str(run), ["t1", "t2"], backend="recorder", limit=3, task_dirs=[tmp_path], options={"shots": 2})
    assert seen(result) == {
        "tasks": ["t1", "t2"],
        "limit": 3,
        "options": {"shots": 2},
        "task_dirs": [str(tmp_path)],
        "where": "in-process",
        "adapter_folded": True,  # the back end gets the run's model, its adapter merged
    }
    eval_run = read_manifest(result["run_dir"])
    assert eval_run["status"] == "completed" and eval_run["parent"] == "20260101-000000-sft"
    assert eval_run["metrics"] == {"t1.acc": 0.2, "t2.acc": 0.21}
    recorded = read_manifest(run)["benchmarks"]
    assert recorded["recorder:t1"] == {"metrics": {"acc": 0.2}, "examples": 4, "limit": 3, "run": eval_run["id"]}
    listing = invoke("runs").output.splitlines()
    assert any(line.startswith("20260101-000000-sft") and "t1 0.2, t2 0.21" in line for line in listing)


def test_an_engine_or_a_back_end_without_an_in_process_model_gets_an_openai_endpoint(recorder, lora_run, tmp_path):
    run = run_copy(lora_run, tmp_path, "20260101-000000-sft")
    for backend, answers in (("recorder", AnswersFrom(engine="hf")), ("recorder-http", AnswersFrom())):
        found = seen(benchmark(str(run), ["t1"], backend=backend, answers=answers))
        assert found["where"] == "endpoint" and found["tokens"] >= 1  # the model answered over HTTP
        assert found["tokenizer"] == str(run / "model")  # the run's tokenizer, with its chat template


def test_runs_diff_compares_two_runs_benchmark_scores(recorder, lora_run, tmp_path):
    one, two = run_copy(lora_run, tmp_path, "20260101-000000-sft"), run_copy(lora_run, tmp_path, "20260102-000000-sft")
    assert invoke("eval", one, "--benchmark", "t1", "--backend", "recorder").exit_code == 0
    shown = invoke("eval", two, "--benchmark", "t1,t2", "--backend", "recorder", "--backend-option", "shots=5")
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines()[0].split()[:3] == ["model", "t1.acc", "t2.acc"]
    rows = [
        line.split()
        for line in invoke("runs", "diff", "20260101-000000-sft", "20260102-000000-sft").output.splitlines()
    ]
    assert ["benchmark.recorder:t1.acc", "0.0", "0.5"] in rows
    assert ["benchmark.recorder:t2.acc", "null", "0.51"] in rows


def test_bad_requests_fail_in_one_line_before_any_model_loads(recorder, lora_run, tmp_path):
    run = run_copy(lora_run, tmp_path, "20260101-000000-sft")
    cases = [
        (["--benchmark", "t1", "--backend", "recorder", "--backend-option", "tries=2"], "unknown option 'tries'"),
        (["--benchmark", "t1", "--backend", "recordr"], "Unknown eval backend 'recordr'"),
        (["--benchmark", "t1", "--data", tmp_path / "x.jsonl"], "not both"),
        (["--benchmark", "t1", "--backend", "recorder", "--engine", "hf", "--endpoint", "http://x/v1"], "not both"),
    ]
    for args, message in cases:
        result = invoke("eval", run, *args)
        assert result.exit_code == 2 and message in result.output, result.output
    assert not list((tmp_path / "home" / "runs").glob("*-eval"))  # nothing was started
    with pytest.raises(RuntimeError, match="the harness broke"):
        benchmark(str(run), ["t1"], backend="recorder", options={"shots": -1})
    (failed,) = (tmp_path / "home" / "runs").glob("*-eval")
    assert read_manifest(failed)["status"] == "failed"
    assert "benchmarks" not in read_manifest(run)


def test_a_recipe_gate_holds_back_a_model_whose_benchmark_score_drops_more_than_a_point(recorder, tmp_path):
    def bench(name, shots, gates=()):
        return {"stage": "eval", "name": name, "benchmarks": ["t1", "t2"], "backend": "recorder",
                "backend_options": {"shots": shots}, "gates": list(gates)}  # fmt: skip

    stages = [
        {"stage": "new-model", "name": "base", "family": "qwen2", "preset": "tiny"},
        bench("bench-base", 3),
        bench("bench-same", 3, ["* >= bench-base - 0.01"]),
        bench("bench-worse", 2, ["* >= bench-base - 0.01"]),
    ]
    path = tmp_path / "gated.yaml"
    path.write_text(yaml.safe_dump({"name": "gated", "stages": stages}))
    with pytest.raises(HeldBack, match=r"'bench-worse': held back: \* >= bench-base - 0.01: t1.acc 0.2 >= 0.29 fails"):
        run_recipe(load_recipe(path))
    (recipe,) = (tmp_path / "home" / "runs").glob("*-recipe-gated")
    steps = read_manifest(recipe)["steps"]
    assert steps["bench-same"]["gates"][0]["passed"] is True
    assert steps["bench-worse"]["gates"][0] == {
        "gate": "* >= bench-base - 0.01",
        "metric": "t1.acc",
        "value": 0.2,
        "bound": pytest.approx(0.29),
        "passed": False,
    }
