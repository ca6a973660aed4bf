"""gpt-oss: found by model type, the harmony format as the published template renders it
(on a fixed date), where training departs from it, a training step, and the released shape."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import transformers.utils.chat_template_utils
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import modelloop
import modelloop.chat
from modelloop.chat import ChatFormat, TemplateError, resolve_chat_format
from modelloop.models.loading import load_model, load_tokenizer, resolve_family
from modelloop.registry import MODELS, get_registry
from modelloop.testing.steps import lora_and_full_steps

PUBLISHED = (Path(__file__).parent / "fixtures" / "gpt-oss-20b.jinja").read_text()
DATE = "2025-08-05"


class FixedDay(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 8, 5, 12)


@pytest.fixture
def fixed_day(monkeypatch):
    """Today is DATE for the published template (transformers' strftime_now) and ours."""
    monkeypatch.setattr(transformers.utils.chat_template_utils, "datetime", FixedDay)
    monkeypatch.setattr(modelloop.chat, "datetime", FixedDay)


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city"},
                    "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
                    "days": {"type": "integer", "default": 1},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "where": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]},
                    "either": {"oneOf": [{"type": "string"}, {"type": "number"}]},
                    "maybe": {"type": ["string", "null"]},
                },
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {"type": "object"}}},
]
WEATHER = call("get_weather", {"city": "Paris"})
CONVERSATIONS = [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], None),
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "thinking": "Greet back."},
        ],
        None,
    ),
    (
        [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [WEATHER]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
        TOOLS,
    ),
    (
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "thinking": "Ask the tool.", "tool_calls": [WEATHER]},
            {"role": "tool", "content": "sunny"},
        ],
        TOOLS,
    ),
]


def test_family_is_found_by_model_type_and_loads(tiny_models):
    loaded = load_model(tiny_models("gpt_oss"))
    assert loaded.family.name == "gpt_oss" and loaded.model.config.model_type == "gpt_oss"
    assert get_registry(MODELS).provider("gpt_oss") == "modelloop-plugin-model-gpt-oss"
    assert loaded.model.config.layer_types == ["sliding_attention", "full_attention"]


def test_harmony_renders_as_the_published_template(tiny_models, fixed_day):
    tokenizer = load_tokenizer(tiny_models("gpt_oss"))
    chat = resolve_chat_format(tokenizer, resolve_family("gpt_oss"))
    for conversation, tools in CONVERSATIONS:
        for end in range(1, len(conversation) + 1):
            messages = conversation[:end]
            for prompt in (False, True) if messages[-1]["role"] != "assistant" else (False,):
                expected = tokenizer.apply_chat_template(
                    messages, tools=tools, chat_template=PUBLISHED, tokenize=False, add_generation_prompt=prompt
                )
                assert chat.render(messages, tools=tools, add_generation_prompt=prompt) == expected
    # the template new-model saved with the tokenizer renders the same standalone (as an
    # engine reading the tokenizer does), its options at their defaults
    messages, tools = CONVERSATIONS[2]
    assert tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) == chat.render(
        messages, tools=tools, add_generation_prompt=False
    )


def test_the_system_message_takes_a_fixed_date_effort_and_identity(tiny_models):
    tokenizer = load_tokenizer(tiny_models("gpt_oss"))
    options = {"current_date": DATE, "reasoning_effort": "high", "model_identity": "You are a test."}
    chat = resolve_chat_format(tokenizer, resolve_family("gpt_oss"), template="harmony", options=options)
    assert chat.render(CONVERSATIONS[0][0][:1], add_generation_prompt=True) == (
        "<|start|>system<|message|>You are a test.\nKnowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\n"
        "Reasoning: high\n\n# Valid channels: analysis, commentary, final. Channel must be included for every "
        "message.<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant"
    )


def test_every_final_answer_ends_with_return_and_tool_calls_with_call(tiny_models):
    """Where training departs from the published template: it renders a final answer with
    <|end|> once a later turn follows, and drops the reasoning of past turns; trained as one
    sequence, every turn keeps the form it is generated in (reasoning, then the answer
    through <|return|>), so the model learns to stop there."""
    chat = resolve_chat_format(load_tokenizer(tiny_models("gpt_oss")), resolve_family("gpt_oss"))
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "thinking": "Ask.", "tool_calls": [call("w", '{"c": "P"}')]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny.", "thinking": "Say it."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome."},
    ]
    assert [text for text, trained in chat.segments(messages) if trained] == [
        "<|channel|>analysis<|message|>Ask.<|end|>"
        '<|start|>assistant to=functions.w<|channel|>commentary json<|message|>{"c": "P"}<|call|>',
        "<|channel|>analysis<|message|>Say it.<|end|><|start|>assistant<|channel|>final<|message|>Sunny.<|return|>",
        "<|channel|>final<|message|>Welcome.<|return|>",
    ]
    published = ChatFormat(PUBLISHED, chat.end_of_turn, {}, chat.special_tokens)
    with pytest.raises(TemplateError, match="does not render assistant turn 4 after its generation prompt"):
        published.segments(messages)  # it drops the call's reasoning once an answer follows
    with pytest.raises(TemplateError, match="one tool call per assistant message"):
        chat.render(
            [{"role": "assistant", "content": "", "tool_calls": [WEATHER, WEATHER]}], add_generation_prompt=False
        )


def test_lora_and_full_steps_train_the_experts_and_preview_shows_the_trained_tokens(tiny_models, tmp_path):
    model = str(tiny_models("gpt_oss"))
    steps = lora_and_full_steps(model, tmp_path, max_length=256)
    weights = load_file(steps.lora / "adapter_model.safetensors")
    assert any(".mlp.experts." in name for name in weights) and any(".self_attn.q_proj." in name for name in weights)
    assert "<|start|>user<|message|>What is 0+1?<|end|><|start|>assistant«<|channel|>final<|message|>1<|return|>»" in (
        steps.preview
    )


def test_gpt_oss_20b_preset_has_the_published_parameter_count():
    fields = dict(resolve_family("gpt_oss").presets["gpt-oss-20b"])
    fields.pop("tokenizer_vocab")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 20_914_757_184
