"""InternVL: found by model type, the -hf checkpoints' ChatML, pictures tiled and tokenised
as InternVLProcessor does, the released shape, and training steps on pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig

import modelloop
from modelloop.chat import TemplateError, resolve_chat_format
from modelloop.cli import build_cli
from modelloop.data.records import Example
from modelloop.data.tokenize import Encoder
from modelloop.models.loading import (
    load_image_processor,
    load_media_tokens,
    load_model,
    load_tokenizer,
    model_class,
    read_config,
    resolve_family,
)
from modelloop.registry import MODELS, get_registry
from modelloop.training import Collator

FIXTURE = (Path(__file__).parent / "fixtures" / "InternVL3-1B-hf.jinja").read_text()
PICTURES = Path(__file__).resolve().parents[3] / "examples" / "data" / "images"


def test_family_is_found_by_model_type_and_loads(tiny_models):
    loaded = load_model(tiny_models("internvl"))
    assert loaded.family.name == "internvl" == loaded.model.config.model_type
    assert loaded.model.config.text_config.model_type == "qwen2"
    assert get_registry(MODELS).provider("internvl") == "modelloop-plugin-model-internvl"


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_the_template_renders_as_the_published_one(add_generation_prompt, tiny_models):
    tokenizer = load_tokenizer(tiny_models("internvl"))
    chat = resolve_chat_format(tokenizer, resolve_family("internvl"))
    conversations = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": " What is 2+3?\n"},
            {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 2+4?"},
            {"role": "assistant", "content": "6"},
        ],
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}, {"type": "video"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        ],
    ]
    for messages in conversations:
        messages = messages[:-1] if add_generation_prompt else messages
        ours = chat.render(messages, add_generation_prompt=add_generation_prompt)
        assert ours == tokenizer.apply_chat_template(
            messages, chat_template=FIXTURE, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    assert [text for text, trained in chat.segments(conversations[0]) if trained] == ["Hello<|im_end|>"]


def test_tool_turns_and_calls_are_refused_as_the_published_template_does_not_write_them(tiny_models):
    chat = resolve_chat_format(load_tokenizer(tiny_models("internvl")), resolve_family("internvl"))
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    with pytest.raises(TemplateError, match="no tool turns"):
        chat.render([{"role": "tool", "content": "x"}], add_generation_prompt=False)
    with pytest.raises(TemplateError, match="no tool calls"):
        chat.render([{"role": "assistant", "content": "", "tool_calls": [call]}], add_generation_prompt=False)


def test_a_picture_is_tiled_and_tokenised_as_internvl_processor_does(tiny_models, tmp_path):
    from PIL import Image

    folder = tiny_models("internvl")
    family, config, tokenizer = resolve_family("internvl"), read_config(folder), load_tokenizer(folder)
    images = load_media_tokens(family, folder, config, tokenizer)
    wide = tmp_path / "wide.png"  # 2:1
    Image.new("RGB", (96, 48), (20, 20, 220)).save(wide)
    record = {
        "messages": [
            {"role": "user", "content": "<image>What shape? <image>"},
            {"role": "assistant", "content": "A circle."},
        ],
        "images": [str(PICTURES / "red-circle-96.png"), str(wide)],
    }
    ((encoded,),) = Encoder(tokenizer, resolve_chat_format(tokenizer, family), images).encode(
        [Example("r", "conversation", record)]
    )
    batch = Collator(tokenizer.pad_token_id, packing=False, media=images)(
        [(encoded.input_ids, encoded.labels, encoded.media)]
    )
    processor = family.vision.processor(tokenizer, load_image_processor(folder), config)
    parts = [{"type": "image"}, {"type": "text", "text": "What shape? "}, {"type": "image"}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}, record["messages"][1]], chat_template=FIXTURE, tokenize=False
    )
    pictures = [Image.open(path).convert("RGB") for path in record["images"]]
    expected = processor(text=text, images=pictures, return_tensors="pt")
    assert encoded.input_ids == expected["input_ids"][0].tolist()
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    # 96 px square: 2 x 2 tiles and a thumbnail; 2:1: 2 x 1 tiles and a thumbnail; 4 tokens a tile
    assert encoded.input_ids.count(images.kinds["image"].token_id) == (5 + 3) * config.image_seq_length == 32


def test_the_released_preset_has_internvl3_1b_parameter_count():
    spec = resolve_family("internvl")
    fields = {
        key: value
        for key, value in spec.presets["internvl3-1b"].items()
        if key not in ("tokenizer_vocab", "image_processor")
    }
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = model_class(spec).from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 938_193_024


def records() -> list[dict]:
    """Eight short conversations, half of them about a picture."""
    found = []
    for number, (colour, shape) in enumerate(
        [("red", "circle"), ("blue", "square"), ("green", "circle"), ("red", "square")]
    ):
        user = f"What is {number}+1?"
        found.append(
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": str(number + 1)}]}
        )
        picture = {"type": "image", "image": str(PICTURES / f"{colour}-{shape}-64.png")}
        found.append(
            {
                "messages": [
                    {"role": "user", "content": [picture, {"type": "text", "text": "What color?"}]},
                    {"role": "assistant", "content": colour},
                ]
            }
        )
    return found


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "shapes.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in records()))
    return path


def test_a_lora_step_on_pictures(tiny_models, data, tmp_path):
    settings = {"model": str(tiny_models("internvl")), "data": [str(data)], "tuner": "lora", "max_steps": 1}
    result = modelloop.sft({**settings, "batch_size": 4, "max_length": 96, "output_dir": str(tmp_path / "run")})
    assert (Path(result["run_dir"]) / "model").is_dir()


def test_sft_with_pictures_and_the_vision_tower_frozen(tiny_models, data, tmp_path):
    settings = {"model": str(tiny_models("internvl")), "data": [str(data)], "tuner": "full", "max_steps": 2}
    result = modelloop.sft(
        {
            **settings,
            "batch_size": 4,
            "max_length": 96,
            "freeze": ["vision"],
            "group_lr": {"aligner": 1e-4},
            "output_dir": str(tmp_path / "run"),
        }
    )
    groups = json.loads((Path(result["run_dir"]) / "manifest.json").read_text())["module_groups"]
    assert groups["vision"]["trainable"] == 0 and groups["aligner"]["lr"] == 1e-4 and groups["llm"]["trainable"] > 0


def test_data_preview_shows_the_trained_answer_and_the_pictures_tokens(tiny_models, data):
    result = CliRunner().invoke(build_cli(), ["data", "preview", str(data), "--model", str(tiny_models("internvl"))])
    assert result.exit_code == 0, result.output
    assert "<|im_start|>user\nWhat is 0+1?<|im_end|>\n<|im_start|>assistant\n«1<|im_end|>»" in result.output
    # a 64 px square: 2 x 2 tiles of 32 px and a thumbnail, 4 tokens each
    assert "<img><IMG_CONTEXT>×20 [red-circle-64.png]</img>\nWhat color?" in result.output
