"""Mixtral: found by model type, the published instruct format, expert LoRA targets, a
training step, and the released shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from modelloop.chat import TemplateError, resolve_chat_format
from modelloop.models.loading import load_model, load_tokenizer, resolve_family
from modelloop.registry import MODELS, get_registry
from modelloop.testing.steps import lora_and_full_steps

PUBLISHED = (Path(__file__).parent / "fixtures" / "Mixtral-8x7B-Instruct-v0.1.jinja").read_text()

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ],
    [{"role": "user", "content": "2+2?\nShow it."}, {"role": "assistant", "content": "  4  "}],
]


def test_family_is_found_by_model_type_and_loads(tiny_models):
    loaded = load_model(tiny_models("mixtral"))
    assert loaded.family.name == "mixtral" and loaded.model.config.model_type == "mixtral"
    assert get_registry(MODELS).provider("mixtral") == "modelloop-plugin-model-mixtral"
    assert loaded.family.tp_plan is None and loaded.model.config.base_model_tp_plan  # transformers' own plan


def test_template_renders_as_the_published_one(tiny_models):
    tokenizer = load_tokenizer(tiny_models("mixtral"))
    chat = resolve_chat_format(tokenizer, resolve_family("mixtral"))
    for conversation in CONVERSATIONS:
        for end in range(1, len(conversation) + 1):
            messages = conversation[:end]
            expected = tokenizer.apply_chat_template(messages, chat_template=PUBLISHED, tokenize=False)
            assert chat.render(messages, add_generation_prompt=True) == expected
            assert chat.render(messages, add_generation_prompt=False) == expected
    assert chat.render(CONVERSATIONS[1], add_generation_prompt=False) == (
        "<s> [INST] Be brief.\n\nHi [/INST] Hello</s> [INST] Bye [/INST] Bye!</s>"
    )
    assert [text for text, trained in chat.segments(CONVERSATIONS[1]) if trained] == [" Hello</s>", " Bye!</s>"]


def test_template_refuses_what_the_published_one_refuses(tiny_models):
    chat = resolve_chat_format(load_tokenizer(tiny_models("mixtral")), resolve_family("mixtral"))
    with pytest.raises(TemplateError, match="no tool turns"):
        chat.render([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}], add_generation_prompt=True)
    with pytest.raises(TemplateError, match="alternate"):
        chat.render([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], add_generation_prompt=True)


def test_lora_and_full_steps_train_the_experts_and_preview_shows_the_trained_tokens(tiny_models, tmp_path):
    model = str(tiny_models("mixtral"))
    parameters = dict(load_model(model).model.named_parameters())
    for target in resolve_family("mixtral").lora_target_parameters:
        assert any(name.endswith(target) and parameters[name].dim() == 3 for name in parameters), target
    steps = lora_and_full_steps(model, tmp_path)
    weights = load_file(steps.lora / "adapter_model.safetensors")
    assert any(".mlp.experts." in name for name in weights) and any(".self_attn.v_proj." in name for name in weights)
    assert "<s> [INST] What is 0+1? [/INST]« 1</s>»" in steps.preview


def test_mixtral_8x7b_preset_has_the_published_parameter_count():
    fields = dict(resolve_family("mixtral").presets["mixtral-8x7b"])
    fields.pop("tokenizer_vocab")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 46_702_792_704
