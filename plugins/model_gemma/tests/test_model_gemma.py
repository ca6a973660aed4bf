"""Gemma families: found by model type, the published chat formats, pictures as Gemma 3's
processor makes them, released shapes, and training steps (text and pictures)."""

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

FIXTURES = Path(__file__).parent / "fixtures"
PICTURES = Path(__file__).resolve().parents[3] / "examples" / "data" / "images"

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    [
        {"role": "user", "content": "  What is 2+3?\n"},
        {"role": "assistant", "content": "5 "},
        {"role": "user", "content": "And 2+4?"},
        {"role": "assistant", "content": "6"},
    ],
    [
        {"role": "user", "content": [{"type": "text", "text": "Name a fruit. "}]},
        {"role": "assistant", "content": [{"type": "text", "text": "An apple."}]},
    ],
]
SYSTEM = [{"role": "system", "content": "Answer in one word."}, *CONVERSATIONS[0]]


def published(tokenizer, fixture: str, messages, add_generation_prompt: bool) -> str:
    template = (FIXTURES / fixture).read_text()
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "gemma3"])
def test_family_is_found_by_model_type_and_loads(family, tiny_models):
    loaded = load_model(tiny_models(family))
    assert loaded.family.name == family == loaded.model.config.model_type
    assert get_registry(MODELS).provider(family) == "modelloop-plugin-model-gemma"
    # Gemma 2 soft-caps its attention scores, which sdpa cannot: it loads with eager attention
    assert loaded.model.config._attn_implementation == ("eager" if family == "gemma2" else "sdpa")


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_the_template_renders_as_the_published_gemma_3_template(add_generation_prompt, tiny_models):
    tokenizer = load_tokenizer(tiny_models("gemma3_text"))
    chat = resolve_chat_format(tokenizer, resolve_family("gemma3_text"))
    pictured = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What colour? "}]},
    ]
    for messages in [*CONVERSATIONS, SYSTEM, pictured]:
        messages = messages[:-1] if add_generation_prompt and messages[-1]["role"] == "assistant" else messages
        ours = chat.render(messages, add_generation_prompt=add_generation_prompt)
        assert ours == published(tokenizer, "gemma-3-4b-it.jinja", messages, add_generation_prompt)
    assert chat.render(SYSTEM, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nAnswer in one word.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
    )


def test_gemma_2_renders_as_its_published_template_and_takes_a_system_prompt_as_gemma_3_does(tiny_models):
    tokenizer = load_tokenizer(tiny_models("gemma2"))
    chat = resolve_chat_format(tokenizer, resolve_family("gemma2"))
    for messages in CONVERSATIONS[:2]:
        for prompt in (False, True):
            turns = messages[:-1] if prompt else messages
            assert chat.render(turns, add_generation_prompt=prompt) == published(
                tokenizer, "gemma-2-2b-it.jinja", turns, prompt
            )
    with pytest.raises(Exception, match="System role not supported"):
        published(tokenizer, "gemma-2-2b-it.jinja", SYSTEM, False)
    assert chat.render(SYSTEM, add_generation_prompt=False) == published(
        tokenizer, "gemma-3-4b-it.jinja", SYSTEM, False
    )


def test_the_model_turn_is_trained_through_end_of_turn_and_tools_are_refused(tiny_models):
    chat = resolve_chat_format(load_tokenizer(tiny_models("gemma2")), resolve_family("gemma2"))
    assert [text for text, trained in chat.segments(SYSTEM) if trained] == ["Hello<end_of_turn>"]
    with pytest.raises(TemplateError, match="no tool turns"):
        chat.render([*CONVERSATIONS[0], {"role": "tool", "content": "x"}], add_generation_prompt=False)


def test_a_picture_is_tokenised_as_gemma_3s_processor_does(tiny_models):
    folder = tiny_models("gemma3")
    family, config, tokenizer = resolve_family("gemma3"), read_config(folder), load_tokenizer(folder)
    picture = PICTURES / "red-circle-96.png"
    images = load_media_tokens(family, folder, config, tokenizer)
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Look: <image> What colour? "},
            {"role": "assistant", "content": "Red."},
        ],
        "images": [str(picture)],
    }
    ((encoded,),) = Encoder(tokenizer, resolve_chat_format(tokenizer, family), images).encode(
        [Example("r", "conversation", record)]
    )
    processor = family.vision.processor(tokenizer, load_image_processor(folder), config)
    from PIL import Image

    messages = [
        record["messages"][0],
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look: "},
                {"type": "image"},
                {"type": "text", "text": " What colour? "},
            ],
        },
        record["messages"][2],
    ]
    with Image.open(picture) as opened:
        expected = processor(
            text=published(tokenizer, "gemma-3-4b-it.jinja", messages, False),
            images=[opened.convert("RGB")],
            return_tensors="pt",
        )
    assert encoded.input_ids == expected["input_ids"][0].tolist()
    assert encoded.input_ids.count(images.kinds["image"].token_id) == config.mm_tokens_per_image == 4
    batch = Collator(tokenizer.pad_token_id, packing=False, media=images)(
        [(encoded.input_ids, encoded.labels, encoded.media)]
    )
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["token_type_ids"], expected["token_type_ids"])  # pictures attend to themselves whole


@pytest.mark.parametrize(
    "family, preset, parameters",
    [
        ("gemma2", "gemma-2-2b", 2_614_341_888),
        ("gemma3_text", "gemma-3-1b", 999_885_952),
        ("gemma3", "gemma-3-4b", 4_300_079_472),
    ],
)
def test_released_presets_have_the_published_parameter_counts(family, preset, parameters):
    spec = resolve_family(family)
    fields = {
        key: value for key, value in spec.presets[preset].items() if key not in ("tokenizer_vocab", "image_processor")
    }
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = model_class(spec).from_config(config)
    assert sum(p.numel() for p in model.parameters()) == parameters


def records(pictured: bool) -> list[dict]:
    """Eight short conversations; with ``pictured``, every other one about a picture."""
    found = []
    for number, colour in enumerate(["red", "blue", "green", "red", "blue", "green", "red", "blue"]):
        user, answer = f"What is {number}+1?", str(number + 1)
        if pictured and number % 2:
            picture = {"type": "image", "image": str(PICTURES / f"{colour}-circle-64.png")}
            user, answer = [picture, {"type": "text", "text": "What color?"}], colour
        found.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    return found


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("family, tuner", [("gemma2", "lora"), ("gemma3_text", "full")])
def test_a_training_step(family, tuner, tiny_models, tmp_path):
    result = modelloop.sft(
        {
            "model": str(tiny_models(family)),
            "data": [str(write(tmp_path / "d.jsonl", records(False)))],
            "tuner": tuner,
            "max_steps": 1,
            "batch_size": 4,
            "max_length": 64,
            "output_dir": str(tmp_path / "run"),
        }
    )
    assert (Path(result["run_dir"]) / "model").is_dir()


def test_sft_with_pictures_and_the_vision_tower_frozen(tiny_models, tmp_path):
    result = modelloop.sft(
        {
            "model": str(tiny_models("gemma3")),
            "data": [str(write(tmp_path / "d.jsonl", records(True)))],
            "tuner": "full",
            "max_steps": 2,
            "batch_size": 4,
            "max_length": 64,
            "freeze": ["vision"],
            "group_lr": {"aligner": 1e-4},
            "output_dir": str(tmp_path / "run"),
        }
    )
    groups = json.loads((Path(result["run_dir"]) / "manifest.json").read_text())["module_groups"]
    assert groups["vision"]["trainable"] == 0 and groups["aligner"]["lr"] == 1e-4 and groups["llm"]["trainable"] > 0


def test_data_preview_shows_the_trained_model_turn_and_the_pictures_tokens(tiny_models, tmp_path):
    data = write(tmp_path / "d.jsonl", records(True)[:2])
    result = CliRunner().invoke(build_cli(), ["data", "preview", str(data), "--model", str(tiny_models("gemma3"))])
    assert result.exit_code == 0, result.output
    assert "<start_of_turn>user\nWhat is 0+1?<end_of_turn>\n<start_of_turn>model\n«1<end_of_turn>»" in result.output
    assert "<start_of_image><image_soft_token>×4 [blue-circle-64.png]<end_of_image>\n\nWhat color?" in result.output
    assert ", 4 image tokens" in result.output


def test_a_named_token_must_be_one_of_the_recipes_special_tokens():
    from modelloop.errors import PluginError
    from modelloop_model_gemma import GEMMA3_TOKENIZER

    assert GEMMA3_TOKENIZER.named_tokens["image_token"] in GEMMA3_TOKENIZER.special_tokens
    with pytest.raises(PluginError, match="named token '<image>' is not one of its special_tokens"):
        type(GEMMA3_TOKENIZER)(
            split_regex=".",
            nfc=False,
            special_tokens=("<eos>",),
            eos_token="<eos>",
            named_tokens={"image_token": "<image>"},
        )
