"""Tokenisation: labels on assistant tokens only, truncation reported, bad data stops training, a disk cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelloop.chat import resolve_chat_format
from modelloop.data.sources import DataError
from modelloop.data.tokenize import IGNORE, prepare_data
from modelloop.models.loading import load_tokenizer, resolve_family


@pytest.fixture
def qwen(tiny_models):
    tokenizer = load_tokenizer(tiny_models("qwen2"))
    return tokenizer, resolve_chat_format(tokenizer, resolve_family("qwen2"))


def conversations(path, count=20, answer=lambda i: str(i * 2)):
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i}+{i}?"}, {"role": "assistant", "content": answer(i)}]}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_labels_are_the_assistant_tokens_and_end_of_turn(tmp_path, qwen):
    tokenizer, chat = qwen
    data = prepare_data([conversations(tmp_path / "d.jsonl")], tokenizer, chat, max_length=128)
    ids, labels = data.input_ids[3].tolist(), data.labels[3].tolist()
    trained = [i for i, label in zip(ids, labels) if label != IGNORE]
    assert tokenizer.decode(trained) == "6<|im_end|>"
    assert [label for label in labels if label != IGNORE] == trained
    prompt = chat.render([{"role": "user", "content": "What is 3+3?"}], add_generation_prompt=True)
    assert ids[: len(ids) - len(trained) - 1] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert data.stats.examples == 20
    assert data.stats.trained_tokens == sum(label != IGNORE for row in data.labels for label in row.tolist())


def test_pretraining_text_trains_every_token_and_ends_with_eos(tmp_path, qwen):
    tokenizer, _ = qwen
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "hello world"}) + "\n")
    data = prepare_data([path], tokenizer, None, max_length=64, kind="text")
    assert data.labels[0].tolist() == data.input_ids[0].tolist()
    assert tokenizer.decode(data.input_ids[0]) == "hello world" + tokenizer.eos_token


def test_long_records_are_truncated_dropped_or_refused(tmp_path, qwen):
    tokenizer, chat = qwen
    path = conversations(tmp_path / "d.jsonl", count=4, answer=lambda i: "x " * (i * 30) + "end")
    truncated = prepare_data([path], tokenizer, chat, max_length=64, use_cache=False)
    assert truncated.stats.truncated == 2 and truncated.stats.examples == 4
    assert max(truncated.lengths) == 64
    dropped = prepare_data([path], tokenizer, chat, max_length=64, truncation="drop", use_cache=False)
    assert (dropped.stats.dropped, dropped.stats.examples) == (2, 2)
    with pytest.raises(DataError) as raised:
        prepare_data([path], tokenizer, chat, max_length=64, truncation="error", use_cache=False)
    assert f"{path}:3: " in str(raised.value) and "longer than max_length 64" in str(raised.value)


def test_bad_records_stop_before_training_unless_skipped(tmp_path, qwen):
    tokenizer, chat = qwen
    path = conversations(tmp_path / "d.jsonl", count=5)
    with path.open("a") as handle:
        handle.write('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n')
        handle.write("not json\n")
    with pytest.raises(DataError) as raised:
        prepare_data([path], tokenizer, chat, max_length=64)
    message = str(raised.value)
    assert f"{path}:6: messages[2] is an empty assistant turn" in message
    assert f"{path}:7: malformed JSON" in message
    assert "--skip-bad-records" in message
    data = prepare_data([path], tokenizer, chat, max_length=64, skip_bad_records=True)
    assert (data.stats.examples, data.stats.skipped_bad) == (5, 2)


def test_second_run_loads_the_cache_and_a_changed_file_does_not(tmp_path, qwen, monkeypatch):
    monkeypatch.setenv("MODELLOOP_CACHE", str(tmp_path / "cache"))
    tokenizer, chat = qwen
    path = conversations(tmp_path / "d.jsonl")
    first = prepare_data([path], tokenizer, chat, max_length=128)
    second = prepare_data([path], tokenizer, chat, max_length=128)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert second.flat_ids.tolist() == first.flat_ids.tolist()
    assert second.flat_labels.tolist() == first.flat_labels.tolist()
    assert (second.offsets.tolist(), second.locations) == (first.offsets.tolist(), first.locations)
    assert second.stats == first.stats
    assert not prepare_data([path], tokenizer, chat, max_length=64).from_cache
    conversations(path, count=21)
    changed = prepare_data([path], tokenizer, chat, max_length=128)
    assert not changed.from_cache and changed.stats.examples == 21


def test_a_failed_cache_write_leaves_nothing_behind(tmp_path, qwen, monkeypatch):
    import numpy

    monkeypatch.setenv("MODELLOOP_CACHE", str(tmp_path / "cache"))
    tokenizer, chat = qwen
    path = conversations(tmp_path / "d.jsonl", count=7)

    def killed(handle, **arrays):
        handle.write(b"half an entry")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(numpy, "savez", killed)
        with pytest.raises(KeyboardInterrupt):
            prepare_data([path], tokenizer, chat, max_length=128)
    assert list((tmp_path / "cache" / "tokenized").iterdir()) == []
    assert not prepare_data([path], tokenizer, chat, max_length=128).from_cache


def test_max_length_must_be_positive(tmp_path, qwen):
    tokenizer, chat = qwen
    with pytest.raises(DataError, match="max_length must be positive"):
        prepare_data([conversations(tmp_path / "d.jsonl")], tokenizer, chat, max_length=0)


def test_a_record_the_template_cannot_render_is_located(tmp_path, qwen):
    tokenizer, chat = qwen
    path = conversations(tmp_path / "d.jsonl", count=2)
    with path.open("a") as handle:
        call = {"id": "1"}  # no function name: passes validation, fails in the template
        record = {
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
        }
        handle.write(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"{path}:3: the chat template"):
        prepare_data([path], tokenizer, chat, max_length=128, use_cache=False)
    data = prepare_data([path], tokenizer, chat, max_length=128, use_cache=False, skip_bad_records=True)
    assert (data.stats.examples, data.stats.skipped_bad) == (2, 1)


def test_the_cache_key_tells_same_content_at_another_path_apart(tmp_path, qwen, monkeypatch):
    monkeypatch.setenv("MODELLOOP_CACHE", str(tmp_path / "cache"))
    tokenizer, chat = qwen
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = conversations(tmp_path / "a" / "x.jsonl")
    b = conversations(tmp_path / "b" / "x.jsonl")
    prepare_data([f"{a}#0.5"], tokenizer, chat, max_length=128)
    second = prepare_data([f"{b}#0.5"], tokenizer, chat, max_length=128)
    assert not second.from_cache
    assert all(location.startswith(str(b)) for location in second.locations)


def tokenised_characters(monkeypatch) -> list[int]:
    """The characters each call from now on gives the tokenizer."""
    from modelloop.data.tokenize import Encoder

    counted: list[int] = []
    token_ids = Encoder.token_ids

    def counting(self, texts):
        counted.append(sum(map(len, texts)))
        return token_ids(self, texts)

    monkeypatch.setattr(Encoder, "token_ids", counting)
    return counted


def test_a_cut_record_has_the_first_tokens_of_the_whole(tmp_path, qwen):
    from modelloop.data.records import read_records
    from modelloop.data.tokenize import Encoder

    tokenizer, chat = qwen
    mixed = "".join(f"Line {i}: naïve café, 日本語 😀\t{'  ' * (i % 7)}x{i * i}!\n" for i in range(800))
    turns = [
        {"role": role, "content": mixed[i * 60 : (i + 1) * 60]} for i in range(20) for role in ("user", "assistant")
    ]
    rows = [
        {"messages": [{"role": "user", "content": "Tell"}, {"role": "assistant", "content": mixed}]},
        {"messages": turns},  # cut in a later turn: the labels must follow it
        {
            "messages": [{"role": "user", "content": "Tell"}, {"role": "assistant", "content": " assistant" * 4000}]
        },  # 10 characters a token
        {"messages": [{"role": "user", "content": "Tell"}, {"role": "assistant", "content": "short"}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    examples = read_records([path]).examples
    encoder = Encoder(tokenizer, chat)
    whole = [sequences[0] for sequences in encoder.encode(examples)]
    for max_length in (16, 64, 200):
        cut = [sequences[0] for sequences in encoder.encode(examples, max_length)]
        limit = 4 * max_length
        assert [(c.input_ids, c.labels) for c in cut] == [(w.input_ids[:limit], w.labels[:limit]) for w in whole]
        assert [c.cut for c in cut] == [len(w) > limit for w in whole] == [True, True, True, False]
    data = prepare_data([path], tokenizer, chat, max_length=200, use_cache=False)
    assert [row.tolist() for row in data.input_ids] == [w.input_ids[:200] for w in whole]
    assert [row.tolist() for row in data.labels] == [w.labels[:200] for w in whole]
    assert data.stats.truncated == 3


def test_a_huge_record_is_tokenised_only_as_far_as_max_length_needs(tmp_path, qwen, monkeypatch):
    tokenizer, chat = qwen
    path = conversations(tmp_path / "d.jsonl", count=2, answer=lambda i: "many words " * (200_000 if i else 1))
    counted = tokenised_characters(monkeypatch)
    truncated = prepare_data([path], tokenizer, chat, max_length=64, use_cache=False)
    assert (truncated.stats.truncated, truncated.lengths[1]) == (1, 64)
    dropped = prepare_data([path], tokenizer, chat, max_length=64, truncation="drop", use_cache=False)
    assert (dropped.stats.dropped, dropped.stats.examples) == (1, 1)
    with pytest.raises(DataError, match=f"{path}:2: more than 256 tokens, longer than max_length 64"):
        prepare_data([path], tokenizer, chat, max_length=64, truncation="error", use_cache=False)
    assert max(counted) < 10_000  # of 2.2 M characters


def test_a_huge_record_with_a_picture_past_the_cut_is_dropped_not_miscounted(tmp_path, tiny_models, monkeypatch):
    from modelloop.models.loading import load_media_tokens, read_config

    model = tiny_models("qwen2_vl")
    tokenizer, family = load_tokenizer(model), resolve_family("qwen2_vl")
    images = load_media_tokens(family, model, read_config(model), tokenizer)
    picture = Path(__file__).resolve().parent.parent / "examples" / "data" / "images" / "red-square-64.png"
    content = [{"type": "text", "text": "many words " * 100_000}, {"type": "image", "image": str(picture)}]
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "red"}]}) + "\n"
    )
    counted = tokenised_characters(monkeypatch)
    with pytest.raises(
        DataError, match="no usable examples"
    ):  # dropped: a cut through a picture's tokens would not match its features
        prepare_data(
            [path], tokenizer, resolve_chat_format(tokenizer, family), max_length=64, truncation="drop", media=images
        )
    assert max(counted) < 10_000
