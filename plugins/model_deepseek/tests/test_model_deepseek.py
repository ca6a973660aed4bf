"""DeepSeek families: found by model type, the published chat formats, MLA and expert
LoRA targets, a training step, and the released shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from modelloop.chat import ChatFormat, TemplateError, resolve_chat_format
from modelloop.models.loading import load_model, load_tokenizer, resolve_family
from modelloop.registry import MODELS, get_registry
from modelloop.testing.steps import lora_and_full_steps

FIXTURES = Path(__file__).parent / "fixtures"
EOS = "<｜end▁of▁sentence｜>"

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>add</think>4"},
        {"role": "user", "content": "3+3?"},
    ],
]


def two_calls(content):
    """A turn of two tool calls (JSON-string arguments, as DeepSeek's templates take them), their results, an answer."""
    calls = [
        {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
        {"type": "function", "function": {"name": "time", "arguments": '{"zone": "CET"}'}},
    ]
    return [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": content, "tool_calls": calls},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "noon"},
        {"role": "assistant", "content": "Sunny, at noon."},
    ]


def prefixes(messages):
    """Each prefix of a conversation, with a generation prompt where it ends before an answer."""
    for end in range(1, len(messages) + 1):
        yield messages[:end], False
        if messages[end - 1]["role"] != "assistant":
            yield messages[:end], True


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_family_is_found_by_model_type_and_loads(family, tiny_models):
    loaded = load_model(tiny_models(family))
    assert loaded.family.name == family
    assert loaded.model.config.model_type == family
    assert get_registry(MODELS).provider(family) == "modelloop-plugin-model-deepseek"
    assert loaded.family.tp_plan is None and loaded.model.config.base_model_tp_plan  # transformers' own plan


def test_v3_renders_as_the_published_template(tiny_models):
    tokenizer = load_tokenizer(tiny_models("deepseek_v3"))
    chat = resolve_chat_format(tokenizer, resolve_family("deepseek_v3"))
    published = (FIXTURES / "DeepSeek-V3.jinja").read_text()
    for conversation in CONVERSATIONS:
        for messages, prompt in prefixes(conversation):
            expected = tokenizer.apply_chat_template(
                messages, chat_template=published, tokenize=False, add_generation_prompt=prompt
            )
            assert chat.render(messages, add_generation_prompt=prompt) == expected
    # transformers drops a None content, and then the published template cannot render a
    # call at all: its calls render here through the kernel's renderer, which keeps it.
    # It closes a turn of calls only after a second call, so a turn of two matches.
    reference = ChatFormat(published, chat.end_of_turn, {}, chat.special_tokens)
    for messages, prompt in prefixes(two_calls(None)):
        assert chat.render(messages, add_generation_prompt=prompt) == reference.render(
            messages, add_generation_prompt=prompt
        )
    trained = [text for text, is_trained in chat.segments(two_calls(None)) if is_trained]
    assert trained[0].endswith("```<｜tool▁call▁end｜><｜tool▁calls▁end｜>" + EOS)
    assert trained[1] == "Sunny, at noon." + EOS  # after <｜tool▁outputs▁end｜>, without <｜Assistant｜>


def test_v3_closes_a_single_call_and_takes_mapping_arguments(tiny_models):
    """Where the published template leaves one call unclosed (and drops calls with a content),
    the call is closed and trained through the end of its turn."""
    chat = resolve_chat_format(load_tokenizer(tiny_models("deepseek_v3")), resolve_family("deepseek_v3"))
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "w", "arguments": {"c": "P"}}}]},
    ]
    assert chat.segments(messages)[-1] == (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>w\n```json\n"
        '{"c": "P"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>' + EOS,
        True,
    )


def test_v31_renders_as_the_published_template_and_trains_reasoning_with_thinking(tiny_models):
    tokenizer = load_tokenizer(tiny_models("deepseek_v3"))
    family = resolve_family("deepseek_v3")
    chat = resolve_chat_format(tokenizer, family, template="deepseek_v3.1")
    published = (FIXTURES / "DeepSeek-V3.1.jinja").read_text()
    for conversation in [*CONVERSATIONS, two_calls("")]:
        for messages, prompt in prefixes(conversation):
            expected = tokenizer.apply_chat_template(
                messages, chat_template=published, tokenize=False, add_generation_prompt=prompt
            )
            assert chat.render(messages, add_generation_prompt=prompt) == expected
    # thinking: the prompt is the published one; the reasoning is trained (and kept in
    # later turns, where the published template drops it)
    thinking = resolve_chat_format(tokenizer, family, template="deepseek_v3.1", options={"thinking": True})
    first = CONVERSATIONS[2][:1]
    assert thinking.render(first, add_generation_prompt=True) == tokenizer.apply_chat_template(
        first, chat_template=published, tokenize=False, add_generation_prompt=True, thinking=True
    )
    pieces = thinking.segments(CONVERSATIONS[2][:2])
    assert pieces[0][0].endswith("<｜Assistant｜><think>")
    assert pieces[1] == ("add</think>4" + EOS, True)


def test_v2_renders_as_the_published_template_and_refuses_tools(tiny_models):
    tokenizer = load_tokenizer(tiny_models("deepseek_v2"))
    chat = resolve_chat_format(tokenizer, resolve_family("deepseek_v2"))
    published = (FIXTURES / "DeepSeek-V2-Lite-Chat.jinja").read_text()
    for conversation in CONVERSATIONS:
        for messages, prompt in prefixes(conversation):
            expected = tokenizer.apply_chat_template(
                messages, chat_template=published, tokenize=False, add_generation_prompt=prompt
            )
            assert chat.render(messages, add_generation_prompt=prompt) == expected
    assert chat.segments(CONVERSATIONS[0])[1] == (" Hello" + EOS, True)
    with pytest.raises(TemplateError, match="no tool turns"):
        chat.render(two_calls(""), add_generation_prompt=False)


@pytest.mark.parametrize("family, query", [("deepseek_v3", ("q_a_proj", "q_b_proj")), ("deepseek_v2", ("q_proj",))])
def test_lora_targets_name_mla_and_expert_weights(family, query, tiny_models):
    model = load_model(tiny_models(family)).model
    spec = resolve_family(family)
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    mla = {*query, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    assert mla <= linear and mla <= set(spec.lora_targets)
    assert {"gate_proj", "up_proj", "down_proj"} <= linear  # the dense layer's MLP and the shared experts
    assert any(name.endswith("mlp.shared_experts.down_proj") for name, _ in model.named_modules())
    parameters = dict(model.named_parameters())
    for target in spec.lora_target_parameters:
        assert any(name.endswith(target) and parameters[name].dim() == 3 for name in parameters), target


def test_lora_and_full_steps_train_and_preview_shows_the_trained_tokens(tiny_models, tmp_path):
    steps = lora_and_full_steps(str(tiny_models("deepseek_v3")), tmp_path)
    adapter = json.loads((steps.lora / "adapter_config.json").read_text())
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(adapter["target_parameters"])
    assert {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"} <= set(adapter["target_modules"])
    weights = load_file(steps.lora / "adapter_model.safetensors")
    assert any(".mlp.experts." in name and "lora_A" in name for name in weights)
    assert f"<｜User｜>What is 0+1?<｜Assistant｜>«1{EOS}»" in steps.preview


@pytest.mark.parametrize(
    "family, preset, parameters",
    [
        ("deepseek_v2", "deepseek-v2-lite", 15_706_484_224),
        # 671,026,419,200 weights in the checkpoint (without its multi-token prediction
        # layer): transformers keeps the routers' 58 x 256 score-correction biases as buffers
        ("deepseek_v3", "deepseek-v3", 671_026_419_200 - 58 * 256),
    ],
)
def test_released_presets_have_the_published_parameter_counts(family, preset, parameters):
    fields = dict(resolve_family(family).presets[preset])
    fields.pop("tokenizer_vocab")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
