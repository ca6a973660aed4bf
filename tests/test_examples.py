"""The shipped examples work: the demo data generator writes valid data in every format."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

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
    subprocess.run([sys.executable, str(REPO / "examples" / "make_demo_data.py"), str(tmp_path)], check=True, capture_output=True)
    shipped = REPO / "examples" / "data"
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file())
    assert sorted(str(path.relative_to(shipped)) for path in shipped.rglob("*") if path.is_file()) == written
    for name in written:
        assert (shipped / name).read_bytes() == (tmp_path / name).read_bytes(), name
