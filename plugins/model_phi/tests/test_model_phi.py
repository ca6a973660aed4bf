"""Phi-3 / Phi-4: found by model type, both published templates rendered exactly, the
Phi-4 template chosen by name, a training step, the released shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modelloop.chat import TemplateError, resolve_chat_format
from modelloop.models.loading import load_model, load_tokenizer, resolve_family
from modelloop.registry import MODELS, get_registry
from modelloop.testing.steps import lora_and_full_steps

FIXTURES = Path(__file__).parent / "fixtures"
PUBLISHED = {
    "phi3": (FIXTURES / "Phi-3-mini-4k-instruct.jinja").read_text(),
    "phi4": (FIXTURES / "phi-4.jinja").read_text(),
}
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


def test_family_is_found_by_model_type_and_loads(tiny_models):
    loaded = load_model(tiny_models("phi3"))
    assert loaded.family.name == "phi3" and loaded.model.config.model_type == "phi3"
    assert get_registry(MODELS).provider("phi3") == "modelloop-plugin-model-phi"
    assert loaded.family.tp_plan is None and loaded.model.config.base_model_tp_plan  # transformers' own plan
    stops = loaded.tokenizer.convert_ids_to_tokens(loaded.model.generation_config.eos_token_id)
    assert stops == ["<|end|>", "<|endoftext|>"]


@pytest.mark.parametrize("template", ["phi3", "phi4"])
def test_template_renders_as_the_published_one(template, tiny_models):
    tokenizer = load_tokenizer(tiny_models("phi3"))
    chat = resolve_chat_format(tokenizer, resolve_family("phi3"), template=template)
    for conversation in CONVERSATIONS:
        for end in range(1, len(conversation) + 1):
            for generation in (True, False):
                expected = tokenizer.apply_chat_template(
                    conversation[:end],
                    chat_template=PUBLISHED[template],
                    tokenize=False,
                    add_generation_prompt=generation,
                )
                assert chat.render(conversation[:end], add_generation_prompt=generation) == expected
    with pytest.raises(TemplateError, match="no tool turns"):
        chat.render([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}], add_generation_prompt=True)


def test_each_turn_is_trained_through_its_end_token_and_phi4_is_picked_by_name(tiny_models):
    tokenizer = load_tokenizer(tiny_models("phi3"))
    family = resolve_family("phi3")
    phi3 = resolve_chat_format(tokenizer, family)
    assert phi3.name == "tokenizer" and phi3.end_of_turn == ("<|end|>",)  # new-model saved the phi3 template
    assert [text for text, trained in phi3.segments(CONVERSATIONS[1]) if trained] == ["Hello<|end|>", "  4  <|end|>"]
    phi4 = resolve_chat_format(tokenizer, family, template="phi4")
    assert phi4.end_of_turn == ("<|im_end|>",)
    assert phi4.render(CONVERSATIONS[0], add_generation_prompt=False) == (
        "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>Hello<|im_end|>"
    )
    assert [text for text, trained in phi4.segments(CONVERSATIONS[1]) if trained] == [
        "Hello<|im_end|>",
        "  4  <|im_end|>",
    ]
    # A Phi-4 checkpoint's own template: its turns are still trained through <|im_end|>.
    tokenizer.chat_template = PUBLISHED["phi4"]
    own = resolve_chat_format(tokenizer, family)
    assert [text for text, trained in own.segments(CONVERSATIONS[1]) if trained] == [
        "Hello<|im_end|>",
        "  4  <|im_end|>",
    ]


def test_lora_and_full_steps_train_and_preview_shows_the_trained_tokens(tiny_models, tmp_path):
    steps = lora_and_full_steps(str(tiny_models("phi3")), tmp_path)
    assert "<|user|>\nWhat is 0+1?<|end|>\n<|assistant|>\n«1<|end|>»\n<|endoftext|>" in steps.preview


@pytest.mark.parametrize("preset, parameters", [("phi-3-mini-4k", 3_821_079_552), ("phi-4", 14_659_507_200)])
def test_released_presets_have_the_published_parameter_counts(preset, parameters):
    fields = dict(resolve_family("phi3").presets[preset])
    fields.pop("tokenizer_vocab")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
