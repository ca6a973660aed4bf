"""Eval gates and promotion (issue 21): a recipe stage's gates stop the recipe and hold the
judged model back when they fail; `promote` points `current:NAME` at a model, which
`serve` takes and `runs tree` marks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from modelloop.aliases import promote, read_aliases, resolve_alias
from modelloop.artifacts import read_manifest
from modelloop.cli import build_cli
from modelloop.errors import ModelloopError
from modelloop.gates import Gate
from modelloop.lineage import find_runs, tree_lines
from modelloop.recipes import HeldBack, RecipeError, load_recipe, run_recipe


@pytest.mark.parametrize(
    ("text", "metrics", "earlier", "passed", "bound"),
    [
        ("accuracy >= 0.8", {"accuracy": 0.8}, {}, True, 0.8),
        ("accuracy > 0.8", {"accuracy": 0.8}, {}, False, 0.8),
        ("accuracy >= eval-base", {"accuracy": 0.5}, {"eval-base": {"accuracy": 0.6}}, False, 0.6),
        ("accuracy >= eval-base - 0.1", {"accuracy": 0.5}, {"eval-base": {"accuracy": 0.6}}, True, 0.5),
        ("reward:accuracy<=sft + 1e-1", {"reward:accuracy": 0.3}, {"sft": {"reward:accuracy": 0.2}}, True, 0.3),
        ("train_loss < 2", {"train_loss": 1.5}, {}, True, 2.0),
    ],
)
def test_a_gate_compares_a_metric_with_a_number_or_an_earlier_stage(text, metrics, earlier, passed, bound):
    verdict = Gate.parse(text).judge(metrics, earlier)
    assert verdict.passed is passed and verdict.bound == pytest.approx(bound)


@pytest.mark.parametrize("text", ["accuracy => 0.8", "accuracy >= ", ">= 0.8", "accuracy >= eval-base -"])
def test_a_malformed_gate_says_how_to_write_one(text):
    with pytest.raises(ValueError, match="write METRIC OP BOUND"):
        Gate.parse(text)


def test_a_pattern_gate_judges_every_metric_it_matches_and_reports_the_first_that_fails():
    metrics = {"gsm8k.exact_match": 0.40, "mmlu.acc": 0.29, "examples": 10}
    base = {"bench-base": {"gsm8k.exact_match": 0.405, "mmlu.acc": 0.31}}
    verdict = Gate.parse("*.* >= bench-base - 0.01").judge(metrics, base)
    assert not verdict.passed and verdict.metric == "mmlu.acc" and verdict.bound == pytest.approx(0.30)
    assert str(verdict) == "*.* >= bench-base - 0.01: mmlu.acc 0.29 >= 0.3 fails"
    assert Gate.parse("gsm8k.* >= bench-base - 0.01").judge(metrics, base).passed
    with pytest.raises(ValueError, match=r"no metric matching 'arc\.\*' \(its metrics: examples, gsm8k"):
        Gate.parse("arc.* >= 0.1").judge(metrics, base)


def test_a_gate_on_a_missing_metric_names_the_metrics_there_are():
    with pytest.raises(ValueError, match=r"stage 'eval-base' has no metric 'accuracy' \(its metrics: exact\)"):
        Gate.parse("accuracy >= eval-base").judge({"accuracy": 1.0}, {"eval-base": {"exact": 0.5}})


def prompts(tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {a}+2?", "solution": str(a + 2)}) + "\n" for a in range(4)))
    return path


def recipe(tmp_path, gates, *, promote_stage=True):
    stages = [
        {"stage": "new-model", "name": "base", "family": "qwen2", "preset": "tiny"},
        {"stage": "eval", "name": "eval-base", "data": str(prompts(tmp_path)), "max_tokens": 4},
        {"stage": "eval", "name": "eval-again", "data": str(prompts(tmp_path)), "max_tokens": 4, "gates": gates},
    ]
    if promote_stage:
        stages.append({"stage": "promote", "from": "base"})
    path = tmp_path / "gated.yaml"
    path.write_text(yaml.safe_dump({"name": "gated", "stages": stages}))
    return load_recipe(path)


@pytest.mark.parametrize(
    ("gates", "message"),
    [
        (["accuracy >= eval-later"], "gate 'accuracy >= eval-later': 'eval-later' is not an earlier stage"),
        (["accuracy about 1"], "stage 3 'eval-again': gate 'accuracy about 1': write METRIC OP BOUND"),
        ("accuracy", "gate 'accuracy': write METRIC OP BOUND"),
    ],
)
def test_a_bad_gate_is_refused_when_the_recipe_is_read(tmp_path, gates, message):
    with pytest.raises(RecipeError, match=message):
        recipe(tmp_path, gates)


def test_a_failed_gate_stops_the_recipe_and_holds_the_model_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELLOOP_HOME", str(tmp_path / "home"))
    # a random tiny model answers no sum: its accuracy is 0, equal to eval-base's and below 0.5
    with pytest.raises(HeldBack, match=r"stage 3 'eval-again': held back: accuracy >= 0.5: 0 >= 0.5 fails"):
        run_recipe(recipe(tmp_path, ["accuracy >= eval-base", "accuracy >= 0.5"]))
    (run,) = [run for run in find_runs() if run.stage == "recipe"]
    assert run.manifest["status"] == "held back"
    assert run.manifest["steps"]["eval-again"]["gates"] == [
        {"gate": "accuracy >= eval-base", "metric": "accuracy", "value": 0.0, "bound": 0.0, "passed": True},
        {"gate": "accuracy >= 0.5", "metric": "accuracy", "value": 0.0, "bound": 0.5, "passed": False},
    ]
    assert "promote" not in run.manifest["steps"] and read_aliases() == {}
    base = read_manifest(run.path / "01-base")
    assert base["held_back"]["stage"] == "eval-again" and "accuracy >= 0.5" in base["held_back"]["reason"]
    report = (run.path / "report.md").read_text()
    assert (
        "## Gates" in report and "eval-again: accuracy >= 0.5 (0 against 0.5) FAILS: the model is held back" in report
    )
    assert any(line.endswith("new-model [held back]") for line in tree_lines(find_runs()))
    with pytest.raises(ModelloopError, match="held back by a gate"):
        promote("gated", run.path / "01-base")


def test_a_recipe_whose_gates_hold_promotes_its_model_for_serve(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELLOOP_HOME", str(tmp_path / "home"))
    result = run_recipe(recipe(tmp_path, ["accuracy >= eval-base"]))
    base = Path(result["run_dir"]) / "01-base"
    assert resolve_alias("current:gated") == str(base.resolve())
    assert resolve_alias("runs/elsewhere") == "runs/elsewhere"
    assert any("new-model" in line and line.endswith("[current:gated]") for line in tree_lines(find_runs()))
    second = promote("gated", base, by="by hand")
    assert second["history"][0]["by"] == Path(result["run_dir"]).name and second["by"] == "by hand"
    missing = CliRunner().invoke(build_cli(), ["serve", "current:nope"])
    assert missing.exit_code != 0
    assert "current:nope: no such alias" in missing.output and "aliases: gated" in missing.output


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"stage": "sft", "data_from": "base"}, "data_from: 'base' is not an earlier feedback stage"),
        ({"stage": "eval", "data": "x.jsonl", "data_from": "users"}, "data_from: 'users' is not an earlier feedback"),
        ({"stage": "sft", "data_from": "users", "data": ["x.jsonl"]}, "instead of data:"),
    ],
)
def test_data_from_names_an_earlier_feedback_stage(tmp_path, stage, message):
    stages = [
        {"stage": "new-model", "name": "base", "family": "qwen2"},
        {"stage": "feedback", "name": "users", "data": str(prompts(tmp_path)), "as": "sft"},
        stage,
    ]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "stages": stages}))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_a_stage_trains_on_the_data_its_feedback_stage_makes(tmp_path):
    stages = [
        {"stage": "new-model", "name": "base", "family": "qwen2"},
        {"stage": "feedback", "name": "users", "data": str(prompts(tmp_path)), "as": "kto", "samples": 3},
        {"stage": "rlhf", "method": "kto", "data_from": "users"},
    ]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "stages": stages}))
    users, kto = load_recipe(path).steps[1:]
    assert (users.config.as_, users.config.samples, users.source) == ("kto", 3, "base")
    assert (kto.data_from, kto.source) == ("users", "base")  # the model of the stage before that made one
