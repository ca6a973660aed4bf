"""The shipped examples work: the demo data generator writes valid data in every format, and
each recipe says what it needs and is checked in seconds on a machine without network."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conftest import REPO
from modelloop.cli import build_cli
from modelloop.data.records import read_records


def test_demo_data_is_valid_in_every_format(tmp_path):
    subprocess.run([sys.executable, REPO / "examples" / "make_demo_data.py", tmp_path, "--count", "50"], check=True)
    records = read_records(sorted(tmp_path.glob("*.jsonl")))
    assert records.problems == []
    assert {path.name: name for path, name in records.formats.items()} == {
        "preference.jsonl": "preference",
        "prompts.jsonl": "prompt",
        "tasks.jsonl": "messages",
        "tasks_alpaca.jsonl": "alpaca",
        "tasks_eval.jsonl": "messages",
        "sums.jsonl": "messages",
        "sum_prompts.jsonl": "prompt",
        "shapes.jsonl": "messages",
        "shapes_sharegpt.jsonl": "sharegpt",
    }
    pictured = read_records([tmp_path / "shapes.jsonl"]).examples
    assert sum(len(e.record.get("images", [])) for e in pictured) == 32 and len(pictured) == 48  # a third text-only
    train = {e.record["messages"][0]["content"] for e in read_records([tmp_path / "tasks.jsonl"]).examples}
    held_out = {e.record["messages"][0]["content"] for e in read_records([tmp_path / "tasks_eval.jsonl"]).examples}
    assert len(train) == 50 and len(held_out) == 5 and not train & held_out


def test_the_shipped_demo_data_is_what_the_generator_writes(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "make_demo_data.py"), str(tmp_path)], check=True, capture_output=True
    )
    shipped = REPO / "examples" / "data"
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file())
    assert sorted(str(path.relative_to(shipped)) for path in shipped.rglob("*") if path.is_file()) == written
    for name in written:
        assert (shipped / name).read_bytes() == (tmp_path / name).read_bytes(), name


EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_the_examples_the_docs_name_are_shipped():
    assert {path.stem for path in EXAMPLES} >= {
        "quickstart",
        "lora-sft",
        "dpo",
        "grpo-custom-reward",
        "qlora-consumer-gpu",
        "export-vllm",
        "scale-out",
        "feedback-loop",
    }


def header(example) -> str:
    return "".join(line for line in example.read_text().splitlines(keepends=True) if line.startswith("#")).split(
        "\nname:"
    )[0]


def needs_nothing(example) -> bool:
    """A recipe that builds its own model: it runs as shipped, offline, with no GPU."""
    return "# Needs: nothing" in header(example)


def without_network(env: dict[str, str], tmp_path) -> dict[str, str]:
    """The environment of a machine whose network is off and that never set HF_HUB_OFFLINE:
    the hub's address refuses connections, and the hub cache is empty."""
    from modelloop.parallel.world import free_port

    env = {key: value for key, value in env.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf")}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_each_example_is_checked_without_network_in_seconds(example, tmp_path, subprocess_env):
    """As shipped: the quickstart checks; a recipe needing the hub fails in one line naming what to
    do, fast, with no retry lines (the hub's client alone would retry for about 25 s)."""
    started = time.monotonic()
    checked = subprocess.run(
        [sys.executable, "-m", "modelloop", "run", str(example), "--check"],
        env=without_network(subprocess_env, tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.monotonic() - started
    assert "Retry" not in checked.stderr
    if needs_nothing(example):
        # needs no hub: what its check costs is importing TRL, not the network
        assert checked.returncode == 0, checked.stderr
        return
    assert seconds < 5, f"{example.name}: --check took {seconds:.1f} s without network"
    (line,) = checked.stderr.splitlines()
    assert checked.returncode == 2
    assert re.search(r"cannot be reached and the model is not in the hub cache|give --set model=PATH", line), line


@pytest.mark.parametrize("example", [path for path in EXAMPLES if not needs_nothing(path)], ids=lambda path: path.stem)
def test_each_example_says_what_it_needs_and_its_offline_line_checks(example, tiny_models):
    """Its header says what it needs and gives a line that runs it on a tiny model built here;
    that line's recipe checks (the check is all a CPU can do of the GPU-only ones)."""
    text = header(example)
    assert "# Needs:" in text
    offline = re.search(r"# Offline[^:]*: (modelloop new-model .*) && (modelloop run .*)", text)
    assert offline, f"{example.name} has no '# Offline...: modelloop new-model ... && modelloop run ...' line"
    run = shlex.split(offline.group(2))
    assert run[:3] == ["modelloop", "run", f"examples/{example.name}"] and "--set" in run
    arguments = [
        str(example),
        "--check",
        *(
            f"model={tiny_models('qwen2')}" if part == "model=runs/tiny" else part
            for part in run[3:]
            if part != "--check"
        ),
    ]
    result = CliRunner().invoke(build_cli(), ["run", *arguments])
    assert result.exit_code == 0, result.output
    assert "stages checked" in result.output
