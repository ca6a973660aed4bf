"""Quiet by default: the main commands, run as a user runs them, write nothing on stderr that
is not modelloop's own; -v brings the libraries' output back; DeepSpeed stays out of the
commands that never use it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

DATA = REPO / "examples" / "data"


def modelloop(env, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelloop", *arguments], env=env, capture_output=True, text=True, timeout=600
    )


def foreign_lines(stderr: str) -> list[str]:
    """The lines that are not modelloop's own one-line notices."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("modelloop: ")]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quiet")
    (folder / "prompts.jsonl").write_text(
        "".join(DATA.joinpath("prompts.jsonl").read_text().splitlines(keepends=True)[:3])
    )
    (folder / "held_out.jsonl").write_text(
        "".join(DATA.joinpath("tasks_eval.jsonl").read_text().splitlines(keepends=True)[:3])
    )
    return folder


def test_the_main_commands_write_only_modelloop_s_lines_on_stderr(work, subprocess_env):
    env = {**subprocess_env, "MODELLOOP_HOME": str(work / "home")}
    model, sft = str(work / "tiny"), str(work / "sft")
    commands = [
        ("new-model", "--family", "qwen2", "--out", model),
        ("data", "check", str(DATA / "tasks.jsonl"), "--model", model, "--max-length", "256"),
        (
            "sft",
            "--model",
            model,
            "--data",
            str(DATA / "tasks.jsonl"),
            "--tuner",
            "lora",
            "--max-steps",
            "2",
            "--output-dir",
            sft,
        ),
        (
            "rlhf",
            "--method",
            "dpo",
            "--model",
            sft,
            "--data",
            str(DATA / "preference.jsonl"),
            "--max-steps",
            "1",
            "--output-dir",
            str(work / "dpo"),
        ),
        (
            "rlhf",
            "--method",
            "grpo",
            "--model",
            sft,
            "--data",
            str(work / "prompts.jsonl"),
            "--reward",
            "accuracy",
            "--max-steps",
            "1",
            "--output-dir",
            str(work / "grpo"),
        ),
        ("export", sft, "--merge", "--out", str(work / "merged")),
        (
            "infer",
            sft,
            "--input",
            str(work / "prompts.jsonl"),
            "--output",
            str(work / "answers.jsonl"),
            "--max-tokens",
            "4",
        ),
        ("eval", sft, "--data", str(work / "held_out.jsonl"), "--metric", "accuracy", "--max-tokens", "4"),
    ]
    for command in commands:
        result = modelloop(env, *command)
        assert result.returncode == 0, f"{command[0]}: {result.stderr}"
        assert foreign_lines(result.stderr) == [], (
            f"modelloop {' '.join(command[:2])} wrote: {foreign_lines(result.stderr)}"
        )
    assert len((work / "answers.jsonl").read_text().splitlines()) == 3


def test_verbose_shows_the_libraries_output(work, subprocess_env):
    result = modelloop(subprocess_env, "-v", "new-model", "--family", "qwen2", "--out", str(work / "verbose"))
    assert result.returncode == 0
    assert any("Writing model shards" in line for line in foreign_lines(result.stderr))


OWNED = """
import json, sys
from modelloop.cli import main
try:
    main(sys.argv[1:], owns_process=True)
except SystemExit:
    pass
print(json.dumps(sys.modules.get("deepspeed") is not None))
"""


def test_commands_that_never_use_deepspeed_leave_it_out(work, subprocess_env):
    """accelerate imports DeepSpeed on every save_pretrained when it is installed."""
    out = str(work / "no-deepspeed")
    result = subprocess.run(
        [sys.executable, "-c", OWNED, "new-model", "--family", "qwen2", "--out", out],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) is False
