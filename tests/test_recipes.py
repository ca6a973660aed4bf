"""Recipes and lineage: checked as a whole, run in order, resumed after a kill, traced by `modelloop runs`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO
from modelloop.cli import build_cli
from modelloop.recipes import RecipeError, check_recipe, load_recipe, parse_recipe

SUMS = [(a, b) for a in range(10) for b in range(10)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-data")
    (root / "chats.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {a}+{b}?"},
                        {"role": "assistant", "content": str(a + b)},
                    ]
                }
            )
            + "\n"
            for a, b in SUMS
        )
    )
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"What is {a}+{b}?", "solution": str(a + b)}) + "\n" for a, b in SUMS)
    )
    (root / "held_out.jsonl").write_text(
        "".join(json.dumps({"prompt": f"What is {a}+{b}?", "solution": str(a + b)}) + "\n" for a, b in SUMS[:8])
    )
    return root


def recipe_file(tmp_path, data, stages, **top):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "vars": {"data": str(data)}, **top, "stages": stages}))
    return path


SMALL = [
    {"stage": "new-model", "name": "base", "family": "qwen2", "preset": "tiny"},
    {"stage": "sft", "data": ["${data}/chats.jsonl"], "tuner": "full", "lr": 2e-3, "max_steps": 6, "max_length": 64},
    {"stage": "rlhf", "name": "grpo", "method": "grpo", "data": ["${data}/prompts.jsonl"], "rewards": ["accuracy"], "num_generations": 4,
     "batch_size": 8, "max_completion_length": 4, "max_steps": 12, "save_steps": 2, "logging_steps": 1, "beta": 0.0},
    {"stage": "eval", "name": "eval-grpo", "data": "${data}/held_out.jsonl", "max_tokens": 4},
]  # fmt: skip


def test_stages_start_from_the_stage_before_or_from_a_named_one(data, tmp_path):
    recipe = load_recipe(
        recipe_file(
            tmp_path,
            data,
            [*SMALL, {"stage": "eval", "name": "eval-base", "from": "base", "data": "${data}/held_out.jsonl"}],
        )
    )
    assert [(step.name, step.source) for step in recipe.steps] == [
        ("base", None),
        ("sft", "base"),
        ("grpo", "sft"),
        ("eval-grpo", "grpo"),
        ("eval-base", "base"),
    ]
    assert recipe.steps[1].config.data == [f"{data}/chats.jsonl"]  # ${data} filled in
    overridden = load_recipe(recipe_file(tmp_path, data, SMALL), ["sft.lr=0.5", "vars.data=/elsewhere"])
    assert overridden.steps[1].config.lr == 0.5 and overridden.steps[1].config.data == ["/elsewhere/chats.jsonl"]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"stages": [*SMALL[:3], {**SMALL[3], "engine": "vlm"}]},
            "stage 4 'eval-grpo' (eval): Unknown engine 'vlm'. Did you mean",
        ),
        (
            {"stages": [*SMALL[:2], {**SMALL[2], "rewards": ["acuracy"]}]},
            "stage 3 'grpo' (rlhf): Unknown reward 'acuracy'. Did you mean 'accuracy'?",
        ),
        ({"stages": [*SMALL[:2], {**SMALL[2], "lr": -1}]}, "stage 3 'grpo' (rlhf): lr: Input should be greater than 0"),
        ({"stages": [SMALL[0], {**SMALL[1], "data": ["/no/such.jsonl"]}]}, "stage 2 'sft' (sft): /no/such.jsonl"),
        ({"stages": [SMALL[0], {**SMALL[3], "from": "grpo"}]}, "from: 'grpo' is not an earlier stage"),
        ({"stages": [{**SMALL[0], "preset": "huge"}]}, "preset: the qwen2 family has no preset 'huge'"),
        ({"stages": [SMALL[1]]}, "no model to start from"),
        ({"stages": [{"stage": "finetune"}]}, "'stage' must be one of new-model, pt, sft"),
        ({"stages": SMALL, "modle": "x"}, "unknown key 'modle'"),
        ({"stages": [SMALL[0], {**SMALL[1], "model": "elsewhere"}]}, "model is set by the recipe (use `from:`"),
        (
            {"stages": [*SMALL, {"stage": "export", "options": {"calibraton": ["x.jsonl"]}}]},
            "stage 5 'export' (export): the merged exporter has no option 'calibraton'; its options: none",
        ),
    ],
)
def test_a_bad_recipe_is_refused_naming_the_stage_and_key(change, message, data, tmp_path):
    raw = {"name": "t", "vars": {"data": str(data)}, "stages": SMALL, **change}
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(raw))
        check_recipe(load_recipe(path))


def test_a_misspelled_tuner_in_the_last_stage_fails_at_once_and_writes_nothing(data, tmp_path, subprocess_env):
    auto = {"stage": "eval", "name": "eval-auto", "data": "${data}/held_out.jsonl", "engine": "auto"}
    again = {"stage": "sft", "name": "again", "data": ["${data}/chats.jsonl"], "tuner": "lorra"}
    path = recipe_file(tmp_path, data, [*SMALL, auto, again])
    home = tmp_path / "home"
    probe = (
        "import sys, time; from modelloop.cli import main; started = time.perf_counter()\n"
        f"try: main(['run', {str(path)!r}])\nexcept SystemExit as exit: code = exit.code\n"
        "print(code, round(time.perf_counter() - started, 2), 'torch' in sys.modules)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe],
        env={**subprocess_env, "MODELLOOP_HOME": str(home)},
        capture_output=True,
        text=True,
    )
    code, seconds, torch_imported = completed.stdout.split()
    assert code == "2", completed.stderr
    assert "stage 6 'again' (sft): Unknown tuner 'lorra'. Did you mean 'lora'?" in completed.stderr
    # checked without the ML stack (engine: auto is not ranked yet, which imports the engines'): well under 2 s
    assert torch_imported == "False"
    print(f"a misspelled tuner in stage 6 is reported after {seconds} s")
    assert not home.exists()


def test_a_recipe_killed_mid_grpo_resumes_without_redoing_sft(data, tmp_path, subprocess_env, monkeypatch):
    home = tmp_path / "home"
    env = {**subprocess_env, "MODELLOOP_HOME": str(home)}
    process = subprocess.Popen(
        [sys.executable, "-m", "modelloop", "run", str(recipe_file(tmp_path, data, SMALL))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list(home.glob("runs/*-recipe-t/03-grpo/checkpoints/checkpoint-4")):
        assert process.poll() is None and time.monotonic() < deadline, "the recipe ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    (out,) = home.glob("runs/*-recipe-t")
    sft_manifest = (out / "02-sft" / "manifest.json").read_text()
    assert json.loads((out / "manifest.json").read_text())["steps"]["grpo"]["status"] == "running"

    resumed = subprocess.run(
        [sys.executable, "-m", "modelloop", "run", "--resume"], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage 2/4 sft: done already" in resumed.stdout
    assert (out / "02-sft" / "manifest.json").read_text() == sft_manifest  # SFT not redone
    grpo_steps = [
        json.loads(line)["step"]
        for line in (out / "03-grpo" / "metrics.jsonl").read_text().splitlines()
        if "reward" in json.loads(line)
    ]
    assert grpo_steps[-1] == 12 and grpo_steps.count(1) == 1  # the steps before the kill were not run again
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["status"] == "completed"
        and [step["status"] for step in manifest["steps"].values()] == ["completed"] * 4
    )
    report = (out / "report.md").read_text()
    assert "| eval-grpo | eval |" in report and "03-grpo/loss.png" in report

    monkeypatch.setenv("MODELLOOP_HOME", str(home))
    runner, cli = CliRunner(), build_cli()
    tree = runner.invoke(cli, ["runs", "tree"]).output.splitlines()
    line_of = {
        name: next(i for i, line in enumerate(tree) if f"/{name}  " in line)
        for name in ("01-base", "02-sft", "03-grpo", "04-eval-grpo")
    }
    assert (
        line_of["01-base"] < line_of["02-sft"] < line_of["03-grpo"] < line_of["04-eval-grpo"]
    )  # each under its parent
    assert "accuracy" in tree[line_of["04-eval-grpo"]]
    listing = runner.invoke(cli, ["runs", "--stage", "sft"]).output
    assert "02-sft" in listing and "03-grpo" not in listing
    assert '"stage": "sft"' in runner.invoke(cli, ["runs", "show", "02-sft"]).output
    assert "config.method" in runner.invoke(cli, ["runs", "diff", "02-sft", "03-grpo"]).output


def test_a_recipe_stored_in_its_run_reads_back_the_same(data, tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, data, SMALL), ["sft.lr=0.5", "grpo.num_generations=2"])
    again = parse_recipe(recipe.source, origin="stored")
    assert again.steps[1].config.lr == 0.5 and again.steps[2].config.num_generations == 2  # --set kept for --resume
    assert [(s.name, s.kind, s.source, s.config) for s in again.steps] == [
        (s.name, s.kind, s.source, s.config) for s in recipe.steps
    ]
    assert Path(again.steps[1].config.data[0]).name == "chats.jsonl"


def test_the_quickstart_in_a_reduced_form_learns(tmp_path, subprocess_env):
    """README's first command, with fewer GRPO steps: every stage runs, and SFT beats the base."""
    home = tmp_path / "home"
    completed = subprocess.run(
        [sys.executable, "-m", "modelloop", "run", str(REPO / "examples" / "quickstart.yaml"), "--set", "vars.grpo_steps=4"],
        env={**subprocess_env, "MODELLOOP_HOME": str(home)}, capture_output=True, text=True,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    (run,) = home.glob("runs/*-recipe-quickstart")
    steps = json.loads((run / "manifest.json").read_text())["steps"]
    assert [step["status"] for step in steps.values()] == ["completed"] * 9
    accuracy = {
        name: steps[name]["metrics"]["accuracy"] for name in ("eval-base", "eval-sft", "eval-grpo", "eval-export")
    }
    assert accuracy["eval-base"] < 0.1 < 0.5 < accuracy["eval-sft"], accuracy
    # the merged export, served by the fastest engine here (llama.cpp, in f16), answers as the run did
    engines = {
        name: json.loads(next(run.glob(f"*-{name}/manifest.json")).read_text())["config"]["engine"]
        for name in ("serve-check", "eval-export")
    }
    assert engines == {"serve-check": "llamacpp", "eval-export": "llamacpp"}
    assert abs(accuracy["eval-export"] - accuracy["eval-grpo"]) <= 0.02
    assert steps["serve-check"]["metrics"]["completion_tokens"] >= 1
    assert "| eval-sft | eval |" in (run / "report.md").read_text()
    assert "eval-base" in completed.stdout and "accuracy" in completed.stdout


def test_the_feedback_loop_in_a_reduced_form_closes(tmp_path, subprocess_env):
    """examples/feedback-loop.yaml with fewer steps: users' ratings of the served model become
    KTO data, the aligned model is no less accurate (its gate holds), it is promoted, and
    the lineage leads from the KTO run back to the served run."""
    home = tmp_path / "home"
    completed = subprocess.run(
        [sys.executable, "-m", "modelloop", "run", str(REPO / "examples" / "feedback-loop.yaml"),
         "--set", "vars.sft_steps=120"],
        env={**subprocess_env, "MODELLOOP_HOME": str(home)}, capture_output=True, text=True,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    (run,) = home.glob("runs/*-recipe-feedback-loop")
    steps = json.loads((run / "manifest.json").read_text())["steps"]
    assert [step["status"] for step in steps.values()] == ["completed"] * 7
    served, aligned = steps["eval-served"]["metrics"]["accuracy"], steps["eval-aligned"]["metrics"]["accuracy"]
    assert aligned >= served > 0.1, (served, aligned)
    assert steps["eval-aligned"]["gates"][0]["passed"]
    users = steps["users"]["metrics"]
    assert users["answers"] == 400 and 0 < users["liked"] < 1 and users["records"] > 0
    kto = json.loads((run / "05-kto" / "manifest.json").read_text())
    (origin,) = kto["data"]["origins"].values()
    assert origin["runs"] == [steps["sft"]["run"]]  # the answers came from the served sft run
    tree = CliRunner().invoke(build_cli(), ["runs", "tree"], env={"MODELLOOP_HOME": str(home)}).output
    assert f"(data: answers of {steps['sft']['run']})" in tree and "[current:feedback-loop]" in tree
