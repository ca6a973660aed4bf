"""GLM-4: found by model type, the published templates rendered exactly, each assistant
turn labelled through the role token that ends it, a training step, the released shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modelloop.chat import resolve_chat_format
from modelloop.models.loading import load_model, load_tokenizer, resolve_family
from modelloop.registry import MODELS, get_registry
from modelloop.testing.steps import lora_and_full_steps

FIXTURES = Path(__file__).parent / "fixtures"
PUBLISHED = {
    "glm4": (FIXTURES / "GLM-4-9B-0414.jinja").read_text(),
    "glm": (FIXTURES / "glm-4-9b-chat-hf.jinja").read_text(),
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "天气 in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time", "parameters": {}}},
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?\nShow it."},
        {"role": "assistant", "content": "  4  "},
    ],
]
#: A tool call and its result in GLM's own message format, and in the canonical one.
NATIVE_TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
    {"role": "observation", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
]
CANONICAL_TOOL_TURNS = [
    NATIVE_TOOL_TURNS[0],
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "sunny"},
    NATIVE_TOOL_TURNS[3],
]


@pytest.mark.parametrize("model_type", ["glm4", "glm"])
def test_family_is_found_by_model_type_and_loads(model_type, tiny_models):
    loaded = load_model(tiny_models(model_type))
    assert loaded.family.name == model_type and loaded.model.config.model_type == model_type
    assert get_registry(MODELS).provider(model_type) == "modelloop-plugin-model-glm"
    assert loaded.family.tp_plan is None and loaded.model.config.base_model_tp_plan  # transformers' own plan
    stops = loaded.model.generation_config.eos_token_id
    assert loaded.tokenizer.convert_ids_to_tokens(stops) == ["<|user|>", "<|observation|>", "<|endoftext|>"]


def published(tokenizer, family: str, messages, *, tools=None, generation: bool) -> str:
    """What the released model's template renders; the older one takes tools on a system message."""
    if tools and family == "glm":
        messages, tools = [{"role": "system", "content": "", "tools": tools}, *messages], None
    return tokenizer.apply_chat_template(
        messages, chat_template=PUBLISHED[family], tools=tools, tokenize=False, add_generation_prompt=generation
    )


@pytest.mark.parametrize("family", ["glm4", "glm"])
def test_template_renders_as_the_published_one(family, tiny_models):
    tokenizer = load_tokenizer(tiny_models(family))
    chat = resolve_chat_format(tokenizer, resolve_family(family))
    cases = [(c, None) for c in CONVERSATIONS] + [(CONVERSATIONS[1], TOOLS), (NATIVE_TOOL_TURNS, TOOLS)]
    for conversation, tools in cases:
        for end in range(1, len(conversation) + 1):
            for generation in (True, False):
                expected = published(tokenizer, family, conversation[:end], tools=tools, generation=generation)
                assert chat.render(conversation[:end], add_generation_prompt=generation, tools=tools) == expected
    # Canonical tool turns render as GLM's own format does.
    for generation in (True, False):
        expected = published(tokenizer, family, NATIVE_TOOL_TURNS, tools=TOOLS, generation=generation)
        assert chat.render(CANONICAL_TOOL_TURNS, add_generation_prompt=generation, tools=TOOLS) == expected
    assert chat.render(CONVERSATIONS[1], add_generation_prompt=True) == (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello<|user|>\n2+2?\nShow it."
        "<|assistant|>\n  4  <|assistant|>"
    )


def test_each_turn_is_labelled_through_the_role_token_that_ends_it(tiny_models):
    tokenizer = load_tokenizer(tiny_models("glm4"))
    chat = resolve_chat_format(tokenizer, resolve_family("glm4"))
    pieces = chat.segments(CONVERSATIONS[1])
    assert [text for text, trained in pieces if trained] == ["\nHello<|user|>", "\n  4  <|user|>"]
    assert (
        "".join(text for text, _ in pieces) == chat.render(CONVERSATIONS[1], add_generation_prompt=False) + "<|user|>"
    )
    trained = [text for text, is_trained in chat.segments(CANONICAL_TOOL_TURNS, TOOLS) if is_trained]
    assert trained == ['get_weather \n{"city": "Paris"}<|observation|>', "\nIt is sunny.<|user|>"]


def test_lora_and_full_steps_train_and_preview_shows_the_trained_tokens(tiny_models, tmp_path):
    steps = lora_and_full_steps(str(tiny_models("glm4")), tmp_path)
    assert "[gMASK]<sop><|user|>\nWhat is 0+1?<|assistant|>«\n1<|user|>»" in steps.preview


@pytest.mark.parametrize(
    "family, preset, parameters",
    [
        ("glm4", "glm-4-9b-0414", 9_400_279_040),
        ("glm4", "glm-4-32b-0414", 32_566_487_552),
        ("glm", "glm-4-9b-chat", 9_399_951_360),
    ],
)
def test_released_presets_have_the_published_parameter_counts(family, preset, parameters):
    fields = dict(resolve_family(family).presets[preset])
    fields.pop("tokenizer_vocab")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
