"""Data files a careless user or an attacker might give: each ends in one line naming the
file (and the line where there is one), never a traceback, and a huge record costs little."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from modelloop.cli import build_cli
from modelloop.data import sources

GOOD = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
DEEP = "[" * 200_000 + "]" * 200_000


def check(*args):
    return CliRunner().invoke(build_cli(), ["data", "check", *map(str, args)])


def parquet(path: Path) -> bytes:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"text": f"t{i}"} for i in range(10)]), path)
    return path.read_bytes()


def zeroed_pages(data: bytes) -> bytes:
    """A Parquet file whose footer is intact and whose column chunks are zeros."""
    body_end = len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]
    return data[:4] + bytes(body_end - 4) + data[body_end:]


@pytest.mark.parametrize(
    "damage",
    [lambda data: b"id,text\n1,hello\n", lambda data: data[: len(data) // 2], zeroed_pages],
    ids=["not-parquet", "cut-short", "damaged-pages"],
)
def test_a_file_that_is_not_parquet_is_one_line_exit_2(tmp_path, damage):
    path = tmp_path / "data.parquet"
    path.write_bytes(damage(parquet(path)))
    result = check(path)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"Error: {path}: not a Parquet file, or a damaged one (")
    assert result.stderr.count("\n") == 1


def save_dataset(path: Path) -> Path:
    import datasets

    datasets.Dataset.from_list([{"text": f"t{i}"} for i in range(10)]).save_to_disk(str(path))
    return path


def cut_arrow(folder: Path) -> None:
    (arrow,) = folder.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:-200])


@pytest.mark.parametrize(
    "damage",
    [
        lambda folder: (folder / "dataset_info.json").write_text("garbage"),
        lambda folder: (folder / "state.json").write_text("{}"),
        lambda folder: (folder / "state.json").write_text("[]"),
        cut_arrow,
    ],
    ids=["info-not-json", "state-without-files", "state-not-an-object", "arrow-cut-short"],
)
def test_a_damaged_datasets_folder_is_one_line_exit_2(tmp_path, damage):
    folder = save_dataset(tmp_path / "folder")
    damage(folder)
    result = check(folder)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(
        f"Error: {folder}: not a folder written by datasets' save_to_disk, or a damaged one ("
    )
    assert result.stderr.count("\n") == 1


def test_the_reported_files_end_without_a_traceback(tmp_path, subprocess_env):
    """The two files of the report, as a user runs them: one line, exit 2 for the file no
    record of which can be read; the record nested 200,000 deep located, exit 1."""
    not_parquet = tmp_path / "data.parquet"
    not_parquet.write_text("hello\n")
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps(GOOD) + "\n" + DEEP + "\n")
    run = [sys.executable, "-m", "modelloop", "data", "check"]
    file = subprocess.run([*run, str(not_parquet)], capture_output=True, text=True, env=subprocess_env)
    record = subprocess.run([*run, str(deep)], capture_output=True, text=True, env=subprocess_env)
    assert (file.returncode, file.stdout, file.stderr.count("\n")) == (2, "", 1)
    assert file.stderr.startswith(f"Error: {not_parquet}: not a Parquet file")
    assert (record.returncode, record.stderr) == (1, "")
    assert f"{deep}:2: malformed JSON: nested too deeply" in record.stdout.splitlines()


def written(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


GOOD_LINE = json.dumps(GOOD)
TWICE = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages": []}'
NESTED_TWICE = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "role": "user", "content": "b"}]}'


@pytest.mark.parametrize(
    "name, content, line, reason, good",
    [
        ("deep.jsonl", f"{GOOD_LINE}\n{DEEP}\n{GOOD_LINE}\n", 2, "malformed JSON: nested too deeply", 2),
        ("deep.json", f"[\n{GOOD_LINE},\n{DEEP},\n{GOOD_LINE}\n]", 3, "malformed JSON: nested too deeply", 1),
        (
            "digits.jsonl",
            f'{GOOD_LINE}\n{{"text": "a", "n": {"9" * 5000}}}\n{GOOD_LINE}\n',
            2,
            "malformed JSON: Exceeds the limit (4300 digits)",
            2,
        ),
        (
            "twice.jsonl",
            f"{GOOD_LINE}\n{TWICE}\n{GOOD_LINE}\n",
            2,
            "malformed JSON: the key 'messages' appears twice in one object",
            2,
        ),
        (
            "nested-twice.jsonl",
            f"{GOOD_LINE}\n{NESTED_TWICE}\n{GOOD_LINE}\n",
            2,
            "malformed JSON: the key 'role' appears twice in one object",
            2,
        ),
        (
            "twice.json",
            f"[\n{GOOD_LINE},\n{GOOD_LINE},\n{TWICE}\n]",
            4,
            "malformed JSON: the key 'messages' appears twice in one object",
            2,
        ),
        ("latin1.json", f"[\n{GOOD_LINE},\n".encode() + b'{"text": "caf\xe9"}\n]', 3, "not UTF-8 text", 0),
        ("latin1.csv", b"instruction,output\nq1,a1\nq2,caf\xe9\nq3,a3\n", 3, "not UTF-8 text", 2),
        ("nul.csv", b"instruction,output\nq1,a1\nq2,a\x002\nq3,a3\n", 3, "a NUL byte in text", 2),
        ("utf16.csv", "instruction,output\nq1,a1\n".encode("utf-16-le"), 1, "a NUL byte in text", 0),
        (
            "huge-header.csv",
            f"instruction,{'x' * 200_000}\nq1,a1\n",
            1,
            "malformed CSV: field larger than field limit",
            0,
        ),
    ],
)
def test_a_record_that_cannot_be_parsed_is_located_and_the_others_still_count(
    tmp_path, name, content, line, reason, good
):
    path = written(tmp_path / name, content)
    result = check(path)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{path}:{line}: {reason}")
    assert lines[-1].startswith(f"{good} good records") and lines[-1].endswith(", 1 bad")


def test_a_line_longer_than_the_limit_is_refused_unread_and_the_next_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_LINE", 2**20)
    path = written(tmp_path / "long.jsonl", f'{GOOD_LINE}\n{{"text": "{"x" * 2**21}"}}\n{GOOD_LINE}\n')
    result = check(path)
    assert result.exit_code == 1
    assert result.stdout.splitlines()[:2] == [f"{path}:2: a line longer than 1 MiB", f"{path}: messages, 2 records"]


def peak_memory(args: list[object], env: dict[str, str]) -> tuple[int, int]:
    """The exit code and peak resident memory (bytes) of ``modelloop *args`` in a process of its own."""
    process = subprocess.Popen(
        [sys.executable, "-m", "modelloop", *map(str, args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss * 1024


def test_a_huge_record_costs_what_a_long_one_does(tmp_path, tiny_models, subprocess_env):
    """A record of 7.7 M characters (5.4 M tokens) checked at max_length 512: tokenised
    whole it took 1.5 GB more than a small file, and 7 s more; reading and rendering it
    take a few copies of it."""
    text = "The quick brown fox jumps over the lazy dog; naïve café 日本語 42.\n" * 120_000
    huge = written(
        tmp_path / "huge.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "Say a lot"}, {"role": "assistant", "content": text}]}),
    )
    small = written(tmp_path / "small.jsonl", GOOD_LINE)
    model = tiny_models("qwen2")
    _, baseline = peak_memory(["data", "check", small, "--model", model, "--max-length", 512], subprocess_env)
    code, peak = peak_memory(["data", "check", huge, "--model", model, "--max-length", 512], subprocess_env)
    assert code == 0
    assert peak - baseline < 30 * huge.stat().st_size
    result = check(huge, "--model", model, "--max-length", 512)
    assert "1 records longer than 512 tokens would be truncated (longest: more than 2048)" in result.stdout
