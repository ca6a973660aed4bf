"""Qwen families: matched by model type, faithful formats, real shapes, MoE metadata."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modelloop.chat import resolve_chat_format
from modelloop.models.loading import load_model, load_tokenizer, resolve_family
from modelloop.registry import MODELS, get_registry

QWEN_FAMILIES = ["qwen2", "qwen3", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("model_type", QWEN_FAMILIES)
def test_family_is_found_by_model_type_and_loads(model_type, tiny_models):
    loaded = load_model(tiny_models(model_type))
    assert loaded.family.name == model_type
    assert loaded.model.config.model_type == model_type
    assert get_registry(MODELS).provider(model_type) == "modelloop-plugin-model-qwen"


def test_qwen25_alias():
    assert resolve_family("qwen2").name == get_registry(MODELS).get("qwen2.5").name


def test_qwen2_template_is_chatml_with_default_system(tiny_models):
    tokenizer = load_tokenizer(tiny_models("qwen2"))
    chat = resolve_chat_format(tokenizer, resolve_family("qwen2"))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert chat.render(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert chat.render(messages[:1], add_generation_prompt=True).endswith("<|im_start|>assistant\n")


THINKING = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
]


def test_qwen3_keeps_thinking_by_default(tiny_models):
    chat = resolve_chat_format(load_tokenizer(tiny_models("qwen3")), resolve_family("qwen3"))
    trained = [text for text, is_trained in chat.segments(THINKING) if is_trained]
    assert trained == ["<think>\nadd them\n</think>\n\n4<|im_end|>"]


def test_qwen3_enable_thinking_false_strips_thinking_and_matches_the_prompt(tiny_models):
    tokenizer = load_tokenizer(tiny_models("qwen3"))
    chat = resolve_chat_format(tokenizer, resolve_family("qwen3"), template="qwen3", options={"enable_thinking": False})
    pieces = chat.segments(THINKING)
    assert [text for text, is_trained in pieces if is_trained] == ["4<|im_end|>"]
    prompt = chat.render(THINKING[:1], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert pieces[0] == (prompt, False)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_default_lora_targets_exist_in_the_model(family, tiny_models):
    model = load_model(tiny_models(family)).model
    spec = resolve_family(family)
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert set(spec.lora_targets) <= linear | {"gate_proj", "up_proj", "down_proj"}
    assert set(spec.lora_targets) & linear >= {"q_proj", "k_proj", "v_proj", "o_proj"}
    parameters = dict(model.named_parameters())
    for target in spec.lora_target_parameters:
        assert any(name.endswith(target) for name in parameters), target


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_tensor_parallel_plan_comes_from_the_config(family, tiny_models):
    assert resolve_family(family).tp_plan is None
    plan = AutoConfig.from_pretrained(tiny_models(family)).base_model_tp_plan
    assert plan["layers.*.self_attn.q_proj"] == "colwise"


@pytest.mark.parametrize(
    "family, preset, parameters",
    [("qwen2", "qwen2.5-0.5b", 494_032_768), ("qwen3", "qwen3-0.6b", 596_049_920)],
)
def test_real_presets_have_the_released_shapes(family, preset, parameters):
    fields = dict(resolve_family(family).presets[preset])
    fields.pop("tokenizer_vocab")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
