"""The LLaVA family: a tiny model built here trains on pictures, packed or not."""

from __future__ import annotations

import json
from pathlib import Path

import modelloop
from modelloop.chat import resolve_chat_format
from modelloop.data.tokenize import prepare_data
from modelloop.models.loading import load_media_tokens, load_tokenizer, read_config, resolve_family
from modelloop.training import Collator, TrainingData

REPO = Path(__file__).resolve().parents[3]
SHAPES = REPO / "examples" / "data" / "shapes.jsonl"


def test_the_llava_1_5_format(tiny_models):
    chat = resolve_chat_format(load_tokenizer(tiny_models("llava")), resolve_family("llava"))
    messages = [{"role": "user", "content": "<image>What color?"}, {"role": "assistant", "content": "red"}]
    assert chat.render(messages, add_generation_prompt=False) == "<s>USER: <image>What color? ASSISTANT: red</s>"
    assert chat.render(messages[:1], add_generation_prompt=True) == "<s>USER: <image>What color? ASSISTANT:"


def tokenized(folder: Path):
    config, tokenizer = read_config(folder), load_tokenizer(folder)
    family = resolve_family("llava")
    images = load_media_tokens(family, folder, config, tokenizer)
    return (
        tokenizer,
        images,
        prepare_data([SHAPES], tokenizer, resolve_chat_format(tokenizer, family), max_length=128, media=images),
    )


def test_each_picture_takes_its_patches_as_image_tokens(tiny_models):
    _, images, data = tokenized(tiny_models("llava"))
    for ids, pictures in zip(data.input_ids, data.media):
        assert (ids == images.kinds["image"].token_id).sum() == 16 * len(
            pictures
        )  # 32 px in 8 px patches, class token left out


def test_packed_examples_keep_their_own_logits(tiny_models):
    import torch
    from transformers import AutoModelForImageTextToText

    folder = tiny_models("llava")
    tokenizer, images, data = tokenized(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    row = max(
        TrainingData.build(data, max_length=128, packing=True).items, key=lambda row: sum(bool(p) for p in row.media)
    )
    assert sum(bool(pictures) for pictures in row.media) >= 2
    packed = Collator(tokenizer.pad_token_id, packing=True, media=images)([row])
    alone = Collator(tokenizer.pad_token_id, packing=False, media=images)
    with torch.no_grad():
        logits = model(**packed).logits[0]
        start = 0
        for length, pictures in zip(row.lengths, row.media):
            single = alone([(row.input_ids[start : start + length], row.labels[start : start + length], pictures)])
            assert torch.allclose(model(**single).logits[0], logits[start : start + length], atol=1e-4)
            start += length


def test_sft_with_the_vision_tower_frozen(tiny_models, tmp_path):
    settings = {
        "model": str(tiny_models("llava")),
        "data": [str(SHAPES)],
        "tuner": "full",
        "max_steps": 2,
        "batch_size": 4,
        "max_length": 128,
    }
    result = modelloop.sft(
        {**settings, "freeze": ["vision"], "group_lr": {"aligner": 1e-4}, "output_dir": str(tmp_path / "run")}
    )
    groups = json.loads((Path(result["run_dir"]) / "manifest.json").read_text())["module_groups"]
    assert groups["vision"]["trainable"] == 0 and groups["aligner"]["lr"] == 1e-4 and groups["llm"]["trainable"] > 0
