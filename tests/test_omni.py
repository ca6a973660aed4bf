"""Qwen2.5-Omni's thinker: pictures, videos and sound clips in one model, one
conversation and one packed row.

The clips, videos and pictures are generated here or shipped in examples/data."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from test_audio import tone, tones, write_jsonl
from test_video import square_video, squares

import modelloop
from conftest import accuracy_before_and_after_sft, assert_packed_examples_match_alone
from modelloop.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
PICTURE = REPO / "examples" / "data" / "images" / "red-square-64.png"
FAMILY = "qwen2_5_omni_thinker"


def everything_at_once(folder: Path) -> dict:
    """One user turn with a picture, a one-second tone and a two-second video."""
    clip = tone(folder / "a440.wav", seconds=1.0)
    video = square_video(folder / "square.mp4", frames=8)
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(PICTURE)},
                    {"type": "audio", "audio": str(clip)},
                    {"type": "video", "video": str(video)},
                    {"type": "text", "text": "What do you see and hear?"},
                ],
            },
            {"role": "assistant", "content": "a red square, a tone, a square moving right"},
        ]
    }


def test_the_template_places_each_kind_and_each_item_takes_its_own_tokens(tiny_models, tmp_path):
    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import prepare_data
    from modelloop.models.loading import load_media_tokens, load_model

    folder = tiny_models(FAMILY)
    loaded = load_model(folder, dtype="fp32")
    tokenizer, chat = loaded.tokenizer, resolve_chat_format(loaded.tokenizer, loaded.family)
    record = everything_at_once(tmp_path)
    rendered = chat.render(record["messages"], add_generation_prompt=False)
    assert rendered.startswith("<|im_start|>system\nYou are Qwen, a virtual human")
    assert (
        "<|vision_bos|><|IMAGE|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>"
        "<|vision_bos|><|VIDEO|><|vision_eos|>What do you see and hear?"
    ) in rendered
    media = load_media_tokens(loaded.family, folder, loaded.model.config, tokenizer)
    data = write_jsonl(tmp_path / "one.jsonl", [record])
    ids = list(prepare_data([data], tokenizer, chat, max_length=1024, media=media).input_ids[0])
    count = {
        token: ids.count(tokenizer.convert_tokens_to_ids(token)) for token in ("<|IMAGE|>", "<|AUDIO|>", "<|VIDEO|>")
    }
    # 64x64 px -> 56x56: 4x4 patches, 2x2 merged = 4; 1 s = 100 mel frames -> 25; 2 s at 2 fps = 4 frames,
    # two time steps of 4x4 patches = 8
    assert count == {"<|IMAGE|>": 4, "<|AUDIO|>": 25, "<|VIDEO|>": 8}, count


def test_packed_examples_of_every_kind_give_each_the_logits_it_has_alone(tiny_models, tmp_path):
    """Pictures, clips and videos keep their time-aligned positions (each example's from 0)
    when packed into one row with text."""

    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import prepare_data
    from modelloop.models.loading import load_media_tokens, load_model
    from modelloop.training import Collator, TrainingData

    folder = tiny_models(FAMILY)
    loaded = load_model(folder, dtype="fp32")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    media = load_media_tokens(loaded.family, folder, model.config, tokenizer)
    records = [
        everything_at_once(tmp_path),
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": str(PICTURE)}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": "red"},
            ]
        },
    ]  # fmt: skip
    data = [
        write_jsonl(tmp_path / "mixed.jsonl", records),
        squares(tmp_path / "v", 2, seed=3),
        tones(tmp_path / "a", 2, seed=3),
    ]
    tokenized = prepare_data(
        data, tokenizer, resolve_chat_format(tokenizer, loaded.family), max_length=1024, media=media
    )
    (row,) = TrainingData.build(tokenized, max_length=1024, packing=True).items
    assert len(row.lengths) == 7 and sum(len(example) for example in row.media) == 8
    rope_index = lambda *args: loaded.family.vision.rope_index(model, *args)  # noqa: E731
    packed = Collator(tokenizer.pad_token_id, packing=True, media=media, rope_index=rope_index)([row])
    assert {"pixel_values", "pixel_values_videos", "input_features", "video_second_per_grid"} <= set(packed)
    alone = Collator(tokenizer.pad_token_id, packing=False, media=media)
    assert_packed_examples_match_alone(model, packed, row, alone)


def test_sft_on_mixed_pictures_clips_and_videos_learns_the_tones(tiny_models, tmp_path):
    """Tones, moving squares and pictures in one run, balanced by modality; the tone
    question is learnt, and the run's model reads pictures, clips and video as the base did."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor

    base = tiny_models(FAMILY)
    held_out = tones(tmp_path / "data", 16, seed=2)
    pictures = write_jsonl(
        tmp_path / "pictures.jsonl",
        [{"messages": [{"role": "user", "content": [{"type": "image", "image": str(PICTURE)}, {"type": "text", "text": "Colour?"}]}, {"role": "assistant", "content": "red"}]}] * 8,
    )  # fmt: skip
    before, after, model = accuracy_before_and_after_sft(
        base,
        held_out,
        ("low", "high"),
        data=[str(tones(tmp_path / "data", 64, seed=1)), str(squares(tmp_path / "video", 8, seed=1)), str(pictures)],
        sampler="modality_balanced",
        sampler_options={"audio_share": 0.75, "video_share": 0.125, "image_share": 0.125},
        max_steps=24,
        batch_size=8,
        lr=1e-3,
        max_length=256,
        output_dir=str(tmp_path / "run"),
    )
    assert AutoImageProcessor.from_pretrained(model).patch_size == 14
    assert AutoFeatureExtractor.from_pretrained(model).sampling_rate == 16000
    assert (model / "video_preprocessor_config.json").is_file()
    assert before <= 0.75 and after >= 0.9, (before, after)


def test_frozen_towers_stay_as_they_were_and_lora_goes_on_a_tower_only_on_request(tiny_models, tmp_path):
    from transformers import AutoModelForMultimodalLM

    base = tiny_models(FAMILY)
    data = [str(tones(tmp_path / "data", 4, seed=4)), str(squares(tmp_path / "video", 4, seed=4))]
    full = modelloop.sft(
        {
            "model": str(base),
            "data": data,
            "tuner": "full",
            "freeze": ["vision", "audio"],
            "group_lr": {"aligner": 1e-3, "llm": 1e-4},
            "max_steps": 2,
            "batch_size": 4,
            "output_dir": str(tmp_path / "full"),
        }
    )
    before = AutoModelForMultimodalLM.from_pretrained(base).state_dict()
    after = AutoModelForMultimodalLM.from_pretrained(Path(full["run_dir"]) / "model").state_dict()
    changed = {name for name in before if not before[name].equal(after[name])}
    assert any(name.startswith("model.visual.merger.") for name in changed)
    assert any(name.startswith("model.audio_tower.proj.") for name in changed)
    assert any(name.startswith("model.language_model.") for name in changed)
    frozen = (
        "model.visual.blocks.",
        "model.visual.patch_embed.",
        "model.audio_tower.layers.",
        "model.audio_tower.conv",
    )
    assert not any(name.startswith(frozen) for name in changed)

    lora = modelloop.sft(
        {
            "model": str(base),
            "data": data,
            "tuner": "lora",
            "tuner_options": {"audio_lora": True},
            "max_steps": 1,
            "batch_size": 4,
            "output_dir": str(tmp_path / "lora"),
        }
    )
    groups = json.loads((Path(lora["run_dir"]) / "manifest.json").read_text())["module_groups"]
    assert groups["llm"]["trainable"] > 0 and groups["audio"]["trainable"] > 0
    assert groups["vision"]["trainable"] == 0 and groups["aligner"]["trainable"] == 0


def test_the_engine_answers_a_picture_a_clip_and_a_video_in_one_request_batched_with_text(tiny_models, tmp_path):
    from modelloop.inference.hf import HFSession
    from modelloop.inference.types import GenerationRequest, SamplingParams

    def url(path: Path, kind: str) -> str:
        return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode()

    clip = base64.b64encode(tone(tmp_path / "a.wav").read_bytes()).decode()
    question = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url(PICTURE, "image/png")}},
                {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}},
                {"type": "video_url", "video_url": {"url": url(square_video(tmp_path / "v.mp4"), "video/mp4")}},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]
    greedy = SamplingParams(max_tokens=3, temperature=0)
    session = HFSession.load(tiny_models(FAMILY), options={"inline": True})
    try:
        requests = [
            GenerationRequest(messages=question, params=greedy),
            GenerationRequest(messages=[{"role": "user", "content": "Hi"}], params=greedy),
        ]
        together = session.generate(requests)
        alone = [session.generate([request])[0] for request in requests]
        assert [g.choices[0].token_ids for g in together] == [g.choices[0].token_ids for g in alone]
        assert session.check(requests[0]) > session.check(requests[1]) + 4 + 25 + 8
    finally:
        session.close()


def test_alignment_says_why_it_takes_no_pictures_for_this_family(tiny_models, tmp_path):
    question = [
        {"role": "user", "content": [{"type": "image", "image": str(PICTURE)}, {"type": "text", "text": "Colour?"}]}
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": question, "chosen": "red", "rejected": "blue"}])
    with pytest.raises(ConfigError, match="the qwen2_5_omni_thinker family gives TRL no processor"):
        modelloop.rlhf(
            {
                "method": "dpo",
                "model": str(tiny_models(FAMILY)),
                "data": [str(pairs)],
                "output_dir": str(tmp_path / "dpo"),
            }
        )
