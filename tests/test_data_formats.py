"""Record formats and files: every format converts; every bad record is named by file and line."""

from __future__ import annotations

import csv
import json

import pytest

from modelloop.data.records import read_records
from modelloop.data.sources import DataError, DataSource

USER_ASSISTANT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def one(tmp_path, record, **kwargs):
    records = read_records([write_jsonl(tmp_path / "data.jsonl", [record])], **kwargs)
    assert records.problems == []
    (example,) = records.examples
    return example


def test_hook_register_dataset_formats_builtins_in_detection_order():
    from modelloop.registry import DATASET_FORMATS, get_registry

    assert get_registry(DATASET_FORMATS).names() == [
        "preference",
        "kto",
        "messages",
        "sharegpt",
        "alpaca",
        "prompt",
        "text",
    ]


def test_messages_keep_tool_calls_and_tools(tmp_path):
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    record = {
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "done"},
            {"role": "assistant", "content": "ok"},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    example = one(tmp_path, record)
    assert example.kind == "conversation"
    assert example.record["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert example.record["tools"] == record["tools"]


def test_sharegpt_roles_are_mapped(tmp_path):
    record = {
        "system": "Be brief.",
        "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}],
    }
    assert one(tmp_path, record).record["messages"] == [{"role": "system", "content": "Be brief."}, *USER_ASSISTANT]


def test_alpaca_with_input_and_history(tmp_path):
    record = {"instruction": "Add", "input": "2+2", "output": "4", "history": [["hi", "hello"]]}
    assert one(tmp_path, record).record["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add\n2+2"},
        {"role": "assistant", "content": "4"},
    ]


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {
            "prompt": [USER_ASSISTANT[0]],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        {"chosen": [*USER_ASSISTANT], "rejected": [USER_ASSISTANT[0], {"role": "assistant", "content": "5"}]},
    ],
    ids=["strings", "message-lists", "implicit-prompt"],
)
def test_preference_forms_agree(tmp_path, record):
    assert one(tmp_path, record).record == {
        "prompt": [USER_ASSISTANT[0]],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }


def test_kto_and_prompt_only_with_extra_columns(tmp_path):
    kto = one(tmp_path, {"prompt": "2+2?", "completion": "4", "label": "true"})
    assert (kto.kind, kto.record["label"], kto.record["completion"]) == (
        "kto",
        True,
        [{"role": "assistant", "content": "4"}],
    )
    prompt = one(tmp_path, {"prompt": "2+2?", "solution": "4"})
    assert prompt.kind == "prompt"
    assert prompt.record == {"prompt": [USER_ASSISTANT[0]], "solution": "4"}


def test_text_for_pretraining(tmp_path):
    assert one(tmp_path, {"text": "Once upon a time"}).record == {"text": "Once upon a time"}


GOOD_MESSAGES = {"messages": USER_ASSISTANT}


@pytest.mark.parametrize(
    "first, line, reason",
    [
        (GOOD_MESSAGES, '{"messages": [{"role": "user", "content": "hi"}', "malformed JSON"),
        (
            GOOD_MESSAGES,
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
            "messages[2] is an empty assistant turn",
        ),
        (
            GOOD_MESSAGES,
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}',
            "messages[2] has unknown role 'robot'",
        ),
        (
            GOOD_MESSAGES,
            '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
            "a user turn cannot come after a user turn",
        ),
        (GOOD_MESSAGES, '{"messages": [{"role": "user", "content": "hi"}]}', "must end with an assistant turn"),
        (GOOD_MESSAGES, "[1, 2]", "record is a list, not an object"),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            '{"prompt": "q", "chosen": "same", "rejected": "same"}',
            "chosen and rejected are identical",
        ),
        (
            {"prompt": "q", "completion": "a", "label": True},
            '{"prompt": "q", "completion": "a", "label": "maybe"}',
            "label must be true or false",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            '{"conversations": [{"from": "alien", "value": "x"}]}',
            "unknown role 'alien'",
        ),
    ],
)
def test_bad_record_is_named_by_file_and_line(tmp_path, first, line, reason):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(first) + "\n" + line + "\n")
    records = read_records([path])
    (problem,) = records.problems
    assert problem.location == f"{path}:2"
    assert reason in problem.reason
    assert len(records.examples) == 1


def test_a_record_no_format_fits(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "a"}])
    (problem,) = read_records([path]).problems
    assert problem.location == f"{path}:1"
    assert "no data format fits this record (fields: answer, question)" in problem.reason
    assert "alpaca (instruction, output)" in problem.reason


def test_alpaca_field_of_the_wrong_type(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"instruction": "Add", "output": "4", "input": ["x"]}])
    assert [str(p) for p in read_records([path]).problems] == [f"{path}:1: input must be text, got list"]


def test_a_field_missing_in_a_later_record(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    (problem,) = read_records([path]).problems
    assert str(problem) == f"{path}:2: missing field 'output' (format alpaca)"


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_records([tmp_path / "nope.jsonl"])


def test_unsupported_file_type(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_records([tmp_path / "data.txt"])


def test_csv_without_the_needed_column_is_one_problem(tmp_path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "answer"])
        writer.writerows([["a", "b"], ["c", "d"]])
    records = read_records([path], format="alpaca")
    assert [str(p) for p in records.problems] == [
        f"{path}:1: no column 'output' for format alpaca (columns: instruction, answer)"
    ]


def test_csv_json_parquet_and_datasets_folder_read_alike(tmp_path):
    import datasets
    import pyarrow
    import pyarrow.parquet

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    with (tmp_path / "a.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    for source in ["a.csv", "a.json", "a.parquet", "folder"]:
        records = read_records([tmp_path / source])
        assert records.problems == []
        assert [e.record for e in records.examples] == [
            e.record for e in read_records([write_jsonl(tmp_path / "a.jsonl", rows)]).examples
        ]
    assert [e.location for e in read_records([tmp_path / "a.json"]).examples] == [
        f"{tmp_path / 'a.json'}:{n}" for n in (2, 7, 12)
    ]
    assert read_records([tmp_path / "a.csv"]).examples[1].location == f"{tmp_path / 'a.csv'}:3"


def test_format_is_detected_per_file_and_can_be_forced(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "a", "output": "b"}])
    messages = write_jsonl(tmp_path / "messages.jsonl", [{"messages": USER_ASSISTANT}])
    records = read_records([alpaca, messages])
    assert {path.name: name for path, name in records.formats.items()} == {
        "alpaca.jsonl": "alpaca",
        "messages.jsonl": "messages",
    }
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [USER_ASSISTANT[0]]}])
    assert (
        read_records([prompts], format="messages")
        .problems[0]
        .reason.startswith("messages must end with an assistant turn")
    )


def test_a_file_of_the_wrong_kind_is_refused_whole(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="holds preference records .* needs conversation data"):
        read_records([pairs], kinds=("conversation",))


def test_sampling_ratios_mix_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    mixed = read_records([f"{a}#0.3", f"{b}#2"], seed=1).examples
    texts = [e.record["text"] for e in mixed]
    assert sum(t.startswith("a") for t in texts) == 3
    assert sorted(t for t in texts if t.startswith("b")) == sorted([f"b{i}" for i in range(10)] * 2)
    assert texts == [e.record["text"] for e in read_records([f"{a}#0.3", f"{b}#2"], seed=1).examples]
    # another seed draws another 3 of 10 (the same 3 one time in 120: the draw is seeded by
    # the file's path too, which changes with every run, so several seeds are asked)
    assert any(
        texts != [e.record["text"] for e in read_records([f"{a}#0.3", f"{b}#2"], seed=seed).examples]
        for seed in range(2, 7)
    )


def test_ratio_syntax():
    assert DataSource.parse("data/x.jsonl#0.25") == DataSource(
        path=__import__("pathlib").Path("data/x.jsonl"), ratio=0.25
    )
    with pytest.raises(DataError, match="must be positive"):
        DataSource.parse("x.jsonl#0")


def test_the_same_file_twice_is_read_twice(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": USER_ASSISTANT}] * 4)
    assert len(read_records([path, f"{path}#0.5"]).examples) == 6


def test_a_bad_first_record_does_not_hide_the_rest_of_the_file(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"nonsense": 1}\n' + "".join(json.dumps({"messages": USER_ASSISTANT}) + "\n" for _ in range(3)))
    records = read_records([path])
    assert [p.location for p in records.problems] == [f"{path}:1"]
    assert len(records.examples) == 3


def test_text_that_is_not_utf8_is_a_located_problem(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    (problem,) = read_records([path]).problems
    assert str(problem) == f"{path}:2: not UTF-8 text (save the file as UTF-8)"


def test_a_byte_order_mark_is_not_content(tmp_path):
    bom = "\ufeff"
    (tmp_path / "a.jsonl").write_text(bom + json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    (tmp_path / "a.json").write_text(bom + json.dumps([{"text": "a"}, {"text": "b"}]))
    (tmp_path / "a.csv").write_text(bom + "text\na\nb\n")
    for name in ("a.jsonl", "a.json", "a.csv"):
        records = read_records([tmp_path / name])
        assert records.problems == []
        assert [example.record for example in records.examples] == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ('[\n  {"text": "a"}\n  {"text": "b"}\n]', 3, "expected ',' between records"),
        ('[\n  {"text": "a"},\n  {"text": "b"}\n', 4, "not closed with ']'"),
    ],
)
def test_a_broken_json_array_is_reported(tmp_path, text, line, reason):
    path = tmp_path / "a.json"
    path.write_text(text)
    records = read_records([path])
    assert [str(p) for p in records.problems] == [f"{path}:{line}: " + records.problems[0].reason]
    assert reason in records.problems[0].reason


def test_a_large_json_array_reads_in_linear_time(tmp_path):
    import time

    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": f"line {i}"} for i in range(50_000)], indent=1))
    started = time.perf_counter()
    records = read_records([path])
    assert len(records.examples) == 50_000
    assert records.examples[-1].location == f"{path}:{50_000 * 3 - 1}"
    assert time.perf_counter() - started < 10  # quadratic line counting took minutes


def test_csv_rows_are_located_where_they_start(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('instruction,output\n"multi\nline\nquestion",answer\nq2,\n')
    records = read_records([path])
    assert records.examples[0].location == f"{path}:2"
    assert [str(p) for p in records.problems] == [f"{path}:5: output is missing or empty"]


def test_a_tool_turn_must_answer_tool_calls(tmp_path):
    record = {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "y"},
            {"role": "tool", "content": "z"},
            {"role": "assistant", "content": "w"},
        ]
    }
    (problem,) = read_records([write_jsonl(tmp_path / "a.jsonl", [record])]).problems
    assert "a tool turn must follow an assistant turn with tool_calls" in problem.reason
