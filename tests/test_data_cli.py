"""`modelloop data check` and `data preview`, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from modelloop.cli import build_cli

GOOD = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
LONG = {"messages": [{"role": "user", "content": "Say a lot"}, {"role": "assistant", "content": "word " * 80}]}


def write(path, *lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def invoke(*args):
    return CliRunner().invoke(build_cli(), [str(arg) for arg in args])


def test_check_reports_every_bad_line_and_exits_1(tmp_path, tiny_models):
    path = write(
        tmp_path / "d.jsonl",
        GOOD,
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}',
        "{oops",
        LONG,
    )
    result = invoke("data", "check", path, "--model", tiny_models("qwen2"), "--max-length", 64)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        f"{path}:2: messages[2] is an empty assistant turn",
        f"{path}:3: malformed JSON: Expecting property name enclosed in double quotes (column 2)",
    ]
    assert f"{path}: messages, 2 records" in lines
    assert "2 good records (2 conversation), 2 bad" in lines
    assert lines[-1].startswith("1 records longer than 64 tokens would be truncated (longest: ")


def test_check_passes_good_data_of_several_files_and_kinds(tmp_path):
    a = write(tmp_path / "a.jsonl", GOOD, GOOD)
    b = write(tmp_path / "b.jsonl", {"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    result = invoke("data", "check", a, f"{b}#2")
    assert result.exit_code == 0, result.output
    assert "4 good records (2 conversation, 2 preference), 0 bad" in result.stdout


def test_check_fails_on_a_file_with_no_records_and_names_it(tmp_path):
    empty, blank, good = (
        tmp_path / "empty.jsonl",
        write(tmp_path / "blank.jsonl", ""),
        write(tmp_path / "good.jsonl", GOOD),
    )
    empty.write_text("")
    result = invoke("data", "check", good, empty, blank)
    assert result.exit_code == 1
    assert f"{empty}: no records" in result.stdout.splitlines() and f"{blank}: no records" in result.stdout.splitlines()
    assert "1 good records (1 conversation), 2 bad" in result.stdout


def test_check_counts_dropped_records(tmp_path, tiny_models):
    path = write(tmp_path / "d.jsonl", GOOD, LONG)
    result = invoke("data", "check", path, "--model", tiny_models("llama"), "--max-length", 64, "--truncation", "drop")
    assert result.exit_code == 0
    assert "1 records longer than 64 tokens would be dropped" in result.stdout


def test_check_with_truncation_error_names_each_record_too_long(tmp_path, tiny_models):
    path = write(tmp_path / "d.jsonl", GOOD, LONG, GOOD)
    result = invoke("data", "check", path, "--model", tiny_models("llama"), "--max-length", 64, "--truncation", "error")
    assert result.exit_code == 1
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(f"{path}:2: ")]
    assert line.endswith(" tokens, longer than max_length 64")
    assert "2 good records (2 conversation), 1 bad" in result.stdout


def test_check_of_a_missing_file_is_one_line_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "modelloop", "data", "check", str(tmp_path / "nope.jsonl")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr == f"Error: {tmp_path / 'nope.jsonl'}: no such file or folder\n"


def test_max_length_needs_a_model(tmp_path):
    result = invoke("data", "check", write(tmp_path / "d.jsonl", GOOD), "--max-length", 10)
    assert result.exit_code == 2 and "--max-length needs --model" in result.output


def test_preview_marks_trained_text_and_counts_tokens(tmp_path, tiny_models):
    path = write(tmp_path / "d.jsonl", GOOD, GOOD, GOOD)
    result = invoke("data", "preview", path, "--model", tiny_models("qwen2"), "-n", 2)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("«4<|im_end|>»") == 2
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in result.stdout
    assert result.stdout.count(" tokens, 2 trained") == 2
