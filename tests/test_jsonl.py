"""Append-only JSON Lines files: a torn last line is left out, said, and cut off before appending resumes."""

from __future__ import annotations

import json
import math

import pytest

from modelloop.errors import ModelloopError
from modelloop.jsonl import read_jsonl, repair, write_record

COMPLETE = '{"index": 0, "loss": 1.5}\n{"index": 1, "loss": 1.25}\n'


@pytest.mark.parametrize("torn", ['{"index": 2, "lo', '{"index": 2, "loss": 1}', "\x00\x00\x00\n"])
def test_a_torn_last_line_is_left_out_and_said(tmp_path, capsys, torn):
    path = tmp_path / "metrics.jsonl"
    path.write_text(COMPLETE + torn)
    assert [row["index"] for row in read_jsonl(path)] == [0, 1]
    assert f"{path}:3: the last line was cut short" in capsys.readouterr().err
    assert path.read_text() == COMPLETE + torn  # reading changes nothing


def test_repair_cuts_the_torn_line_so_the_next_record_starts_a_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(COMPLETE + '{"index": 2, "resp')
    assert len(repair(path)) == 2
    with path.open("a") as out:
        write_record(out, {"index": 2, "response": "again"})
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_a_broken_line_before_the_last_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"index": 0}\n{"index": 1, oops\n{"index": 2}\n')
    with pytest.raises(ModelloopError, match=r"metrics.jsonl:2: not a JSON object.*changed by hand"):
        read_jsonl(path)
    path.write_text('{"index": 0}\n[1, 2]\n{"index": 2}\n')  # JSON, but not a record
    with pytest.raises(ModelloopError, match=r"metrics.jsonl:2: not a JSON object"):
        read_jsonl(path)


def test_records_are_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with path.open("w") as out:
        write_record(out, {"loss": math.nan, "reward": math.inf, "rewards": [1.0, -math.inf], "text": "é"})
    line = path.read_text()
    assert json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} written")) == {
        "loss": None,
        "reward": None,
        "rewards": [1.0, None],
        "text": "é",
    }


def test_no_file_has_no_records(tmp_path):
    assert read_jsonl(tmp_path / "missing.jsonl") == [] and repair(tmp_path / "missing.jsonl") == []
