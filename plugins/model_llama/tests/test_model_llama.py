"""Llama and Mistral families: matched by model type, faithful formats, real shapes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modelloop.chat import resolve_chat_format
from modelloop.models.loading import load_model, load_tokenizer, resolve_family

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_family_is_found_by_model_type_and_loads(family, tiny_models):
    loaded = load_model(tiny_models(family))
    assert loaded.family.name == family
    assert loaded.model.config.model_type == family


def test_llama3_format(tiny_models):
    chat = resolve_chat_format(load_tokenizer(tiny_models("llama")), resolve_family("llama"))
    assert chat.render(MESSAGES, add_generation_prompt=True) == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama2_format_folds_the_system_prompt_into_the_first_turn(tiny_models):
    tokenizer = load_tokenizer(tiny_models("mistral"))  # "<s>" / "</s>" like Llama 2
    chat = resolve_chat_format(tokenizer, resolve_family("llama"), template="llama2")
    assert chat.render(MESSAGES, add_generation_prompt=True) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST]"
    )
    trained = [text for text, is_trained in chat.segments(MESSAGES[:3]) if is_trained]
    assert trained == [" Hello </s>"]


def test_mistral_format(tiny_models):
    chat = resolve_chat_format(load_tokenizer(tiny_models("mistral")), resolve_family("mistral"))
    assert chat.render(MESSAGES[1:], add_generation_prompt=True) == "<s>[INST] Hi [/INST] Hello </s>[INST] Bye [/INST]"


def test_inst_templates_refuse_tool_turns(tiny_models):
    from modelloop.chat import TemplateError

    chat = resolve_chat_format(load_tokenizer(tiny_models("mistral")), resolve_family("mistral"))
    with pytest.raises(TemplateError, match="no tool turns"):
        chat.render([{"role": "tool", "content": "x"}], add_generation_prompt=False)


def test_llama_3_2_1b_preset_has_the_released_shape():
    fields = dict(resolve_family("llama").presets["llama-3.2-1b"])
    fields.pop("tokenizer_vocab")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400
    assert config.rope_parameters["rope_type"] == "llama3"
