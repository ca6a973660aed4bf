"""Streaming sft and pt (``streaming: true``): the batches of the pre-tokenised path, bad
records named by file:line as they are read, a stopped run resumed at the exact record,
and hub dataset ids."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import modelloop
from modelloop.config import ConfigError
from modelloop.data.sources import DataError
from modelloop.data.streaming import HubDataset, Stream, StreamPosition, StreamSource
from modelloop.data.tokenize import Encoder


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def chats(count):
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i}+{i % 7}?"},
                {"role": "assistant", "content": str(i + i % 7)},
            ]
        }
        for i in range(count)
    ]


def texts(count):
    return [{"text": f"The number after {i} is {i + 1}." + " And then more." * (i % 4)} for i in range(count)]


def settings(tiny_models, data, out, **overrides):
    return {
        "model": str(tiny_models("qwen2")),
        "data": [str(data)],
        "max_length": 64,
        "batch_size": 8,
        "lr": 2e-3,
        "max_steps": 3,
        "logging_steps": 1,
        **({"output_dir": str(out)} if out is not None else {}),
        **overrides,
    }


def losses(run):
    return [
        record["loss"]
        for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "loss" in record
    ]


def test_streaming_sft_trains_on_the_batches_of_the_pretokenised_path(tiny_models, tmp_path):
    """Data that fits one buffer is packed and ordered as the pre-tokenised path packs and
    orders it: the same batches, so the same loss at every step (LoRA, dropout included),
    and the same evaluation on data read beforehand."""
    data = write_jsonl(tmp_path / "chats.jsonl", chats(120))
    read = modelloop.sft(settings(tiny_models, data, tmp_path / "read", eval_data=[str(data)]))
    streamed = modelloop.sft(settings(tiny_models, data, tmp_path / "streamed", eval_data=[str(data)], streaming=True))
    assert losses(tmp_path / "streamed") == pytest.approx(losses(tmp_path / "read"), rel=1e-6)
    assert streamed["metrics"]["eval_loss"] == pytest.approx(read["metrics"]["eval_loss"], rel=1e-6)
    stats = json.loads((tmp_path / "streamed" / "manifest.json").read_text())["data"]["stats"]
    assert stats["streamed"] and stats["examples"] == 120 and stats["formats"] == {str(data): "messages"}


def test_streaming_pt_reads_a_dataset_folder_through_load_dataset(tiny_models, tmp_path):
    """``hf:///path`` goes through ``datasets.load_dataset(..., streaming=True)``, the code
    a hub id takes, and trains on the batches of the same records read beforehand."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    data = write_jsonl(folder / "train.jsonl", texts(150))
    modelloop.pt(settings(tiny_models, data, tmp_path / "read", tuner="full"))
    modelloop.pt(settings(tiny_models, f"hf://{folder}", tmp_path / "streamed", tuner="full", streaming=True))
    assert losses(tmp_path / "streamed") == pytest.approx(losses(tmp_path / "read"), rel=1e-6)
    manifest = json.loads((tmp_path / "streamed" / "manifest.json").read_text())
    assert manifest["data"]["train"] == [f"hf://{folder}"]


def test_bad_records_are_skipped_counted_and_named_by_file_and_line(tiny_models, tmp_path, capsys):
    records = [json.dumps(record) for record in texts(60)]
    records[2] = '{"text": "cut short'
    records[40] = json.dumps({"text": ["a list"]})
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(records) + "\n")
    options = {"streaming": True, "skip_bad_records": True, "stream_buffer": 16, "packing": False, "max_steps": 8}
    modelloop.pt(settings(tiny_models, data, tmp_path / "run", **options))
    err = capsys.readouterr().err
    assert f"modelloop: skipped bad record {data}:3: malformed JSON" in err
    assert f"modelloop: skipped bad record {data}:41: text must be text, got list" in err
    stats = json.loads((tmp_path / "run" / "manifest.json").read_text())["data"]["stats"]
    assert stats["skipped_bad"] == 2


def test_a_bad_record_stops_a_streaming_run_where_it_is_read(tiny_models, tmp_path):
    records = [json.dumps(record) for record in texts(200)]
    records[149] = '{"text": "a", "text": "b"}'
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(records) + "\n")
    with pytest.raises(DataError, match=f"{data}:150: malformed JSON: the key 'text' appears twice") as raised:
        modelloop.pt(settings(tiny_models, data, tmp_path / "run", streaming=True, stream_buffer=16, max_steps=50))
    assert "--skip-bad-records" in str(raised.value)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "failed"
    assert 1 <= len(losses(tmp_path / "run")) < 50  # it trained on the records before the bad one


def test_a_killed_streaming_run_resumes_to_the_same_weights(tiny_models, tmp_path, subprocess_env):
    """Buffers of 12 examples, 4 rows a step, a checkpoint every 4 steps: the process is
    killed (SIGKILL) once its first checkpoint exists, inside a buffer, and the run goes on
    into later passes over the data. Resumed, it reads the batches an uninterrupted run
    reads (LoRA's dropout draws included) and ends with the same weights."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "corpus.jsonl", texts(50))
    run = settings(tiny_models, data, None, streaming=True, stream_buffer=12, batch_size=4, max_length=32)
    run.update(max_steps=24, save_steps=4)
    modelloop.pt({**run, "output_dir": str(tmp_path / "whole")})

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "modelloop", "pt", "--output-dir", str(killed), "--streaming"]
    for key in ("model", "max_length", "batch_size", "lr", "max_steps", "logging_steps", "save_steps", "stream_buffer"):
        command += [f"--{key.replace('_', '-')}", str(run[key])]
    process = subprocess.Popen(
        [*command, "--data", str(data)], env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = killed / "checkpoints" / "checkpoint-4"
    deadline = time.monotonic() + 120
    while not first.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert json.loads((killed / "manifest.json").read_text())["status"] == "running"
    position = json.loads((first / "stream.json").read_text())
    assert position["rows"] > 0 and (position["epoch"], position["buffer"]) == (0, 1)
    assert position["buffer_starts_at"] == f"{data}:13"

    modelloop.pt({**run, "output_dir": str(killed), "resume": True})
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["data"]["stats"]["pass"] >= 2
    expected = load_file(tmp_path / "whole" / "model" / "adapter_model.safetensors")
    got = load_file(killed / "model" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert losses(killed) == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)


class Letters:
    """A tokenizer of one token a character."""

    eos_token = "."

    def __call__(self, texts, add_special_tokens):
        return {"input_ids": [[ord(character) for character in text] for text in texts]}


def letter_stream(sources, position=None, buffer_size=3):
    """A stream whose items are the records' locations, shuffled within each buffer."""
    return Stream(
        [str(source) for source in sources],
        Encoder(Letters(), None),
        lambda data, seed: random.Random(seed).sample(data.locations, len(data.locations)),
        kind="text",
        max_length=64,
        buffer_size=buffer_size,
        position=position,
    )


def test_a_stream_started_again_at_any_position_goes_on_with_the_same_items(tmp_path):
    """Three sources read in turn (a JSONL file found again by byte offset, a Parquet file
    by row group and row, a CSV file by record index, read twice a pass: ``#2``), buffers
    of 3: restarted from the position after any item, the stream gives the items that
    followed it, passes over the data included."""
    import pyarrow
    import pyarrow.parquet

    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(7)])
    b = tmp_path / "b.csv"
    b.write_text("text\n" + "".join(f"b{i}\n" for i in range(3)))
    c = tmp_path / "c.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": [f"c{i}" for i in range(5)]}), c, row_group_size=2)
    sources = [a, f"{b}#2", c]
    with letter_stream(sources) as stream:
        items = list(itertools.islice(stream.items(), 40))
    names = [item for item, _, _ in items]
    first_pass = [f"{a}:{n}" for n in range(1, 8)] + [f"{b}:{n}" for n in (2, 3, 4)] * 2
    first_pass += [f"{c}:{n}" for n in range(1, 6)]
    assert sorted(names[:18]) == sorted(first_pass) and sorted(names[18:36]) == sorted(first_pass)
    assert sorted(names[:3]) == sorted([f"{a}:1", f"{b}:2", f"{c}:1"])  # in turn
    for count, (_, buffer, rows) in enumerate(items, start=1):
        position = json.loads(json.dumps(StreamPosition(buffer, rows).to_dict()))
        with letter_stream(sources, position) as again:
            assert [item for item, _, _ in itertools.islice(again.items(), 40 - count)] == names[count:]
    with pytest.raises(DataError, match="read with buffer_size 3, and this run has 4: resume with the data settings"):
        letter_stream(sources, position, buffer_size=4)


@pytest.mark.parametrize(
    "text, parts",
    [
        ("hf://org/name", ("org/name", None, "train")),
        ("hf://wikitext:wikitext-103-raw-v1@validation", ("wikitext", "wikitext-103-raw-v1", "validation")),
        ("hf://org/name@test", ("org/name", None, "test")),
        ("hf:///data/corpus", ("/data/corpus", None, "train")),
    ],
)
def test_hub_dataset_ids_parse(text, parts):
    hub = HubDataset.parse(text)
    assert (hub.name, hub.config, hub.split) == parts
    source = StreamSource.parse(f"{text}#0.5")
    assert (source.label, source.ratio, source.hub) == (text, 0.5, hub)


@pytest.mark.parametrize("text", ["hf://", "hf://org/name/more", "hf://org/name:", "hf://org/name@", "hf://a b"])
def test_a_malformed_hub_id_is_named(text):
    with pytest.raises(DataError, match=r"not a hub dataset id \(hf://org/name\[:config\]\[@split\]"):
        HubDataset.parse(text)


def test_a_hub_dataset_offline_fails_in_one_line_before_a_run_folder(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELLOOP_HOME", str(tmp_path / "home"))
    with pytest.raises(DataError) as raised:
        modelloop.pt(settings(tiny_models, "hf://org/name:en@train", None, streaming=True, max_steps=1))
    message = str(raised.value)
    assert message.startswith("hf://org/name:en@train: cannot stream it (Couldn't reach 'org/name' on the Hub")
    assert "HF_HUB_OFFLINE and HF_DATASETS_OFFLINE keep this process off the hub" in message
    assert "\n" not in message
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_steps": None}, "streaming needs max_steps"),
        ({"eval_split": 0.1}, "streaming holds no data back: give eval_data instead of eval_split"),
        ({"nproc": 2}, "streaming reads the data in one process, and this plan has 2: train with --nproc 1"),
        ({"streaming": False}, "hf://org/name: a hub dataset is read as a stream: train on it with --streaming"),
    ],
)
def test_what_streaming_cannot_do_is_refused_in_one_line(overrides, message, tiny_models, tmp_path):
    data = "hf://org/name" if overrides.get("streaming") is False else str(write_jsonl(tmp_path / "t.jsonl", texts(4)))
    with pytest.raises(ConfigError) as raised:
        modelloop.pt({**settings(tiny_models, data, tmp_path / "run", streaming=True), **overrides})
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "run").exists()


def test_a_recipe_checks_a_streaming_stage_up_to_its_first_record(tmp_path):
    import yaml

    from modelloop.recipes import RecipeError, check_recipe, load_recipe

    stages = [
        {"stage": "new-model", "name": "base", "family": "qwen2", "preset": "tiny"},
        {"stage": "pt", "data": ["hf://org/name"], "streaming": True, "max_steps": 2},
    ]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "stages": stages}))
    with pytest.raises(RecipeError, match=r"stage 2 'pt' \(pt\): hf://org/name: cannot stream it"):
        check_recipe(load_recipe(path))
