"""Chat templates: rendering matches transformers, every assistant turn is trained, prompts match inference."""

from __future__ import annotations

import pytest

from modelloop.chat import ChatFormat, TemplateError, resolve_chat_format
from modelloop.models.loading import load_tokenizer, read_config, resolve_family

FAMILIES = ["qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama", "mistral"]

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


def chat_for(model_dir, **kwargs):
    tokenizer = load_tokenizer(model_dir)
    family = resolve_family(read_config(model_dir).model_type)
    return tokenizer, resolve_chat_format(tokenizer, family, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_rendering_matches_the_tokenizers_own_template(family, tiny_models):
    tokenizer, chat = chat_for(tiny_models(family))
    for messages, add_generation_prompt in [
        (CONVERSATION, False),
        (CONVERSATION[:4], True),
        (CONVERSATION[1:3], False),
    ]:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert chat.render(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_every_assistant_turn_is_trained_through_its_end_of_turn(family, tiny_models):
    _, chat = chat_for(tiny_models(family))
    pieces = chat.segments(CONVERSATION)
    trained = [text for text, is_trained in pieces if is_trained]
    assert len(trained) == 2
    for text, answer in zip(trained, ["4", "6"]):
        assert answer in text
        assert text.rstrip().endswith(chat.end_of_turn)
    assert "".join(text for text, _ in pieces) == chat.render(CONVERSATION, add_generation_prompt=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_prompt_is_byte_identical_to_the_generation_prompt(family, tiny_models):
    _, chat = chat_for(tiny_models(family))
    pieces = chat.segments(CONVERSATION)
    assistant_turns = [i for i, m in enumerate(CONVERSATION) if m["role"] == "assistant"]
    for turn, (index, _) in zip(assistant_turns, [(i, p) for i, p in enumerate(pieces) if p[1]]):
        before = "".join(text for text, _ in pieces[:index])
        assert before == chat.render(CONVERSATION[:turn], add_generation_prompt=True)


def test_tool_calls_and_responses_render_and_only_assistant_turns_train(tiny_models):
    _, chat = chat_for(tiny_models("qwen2"))
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18C"},
        {"role": "assistant", "content": "It is 18C."},
    ]
    pieces = chat.segments(messages)
    trained = [text for text, is_trained in pieces if is_trained]
    assert trained == [
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 18C.<|im_end|>",
    ]
    assert "<tool_response>\n18C\n</tool_response>" in "".join(text for text, is_trained in pieces if not is_trained)


def test_a_named_template_overrides_the_tokenizers(tiny_models):
    _, chat = chat_for(tiny_models("qwen2"), template="chatml")
    assert chat.name == "chatml"
    assert "You are a helpful assistant." not in chat.render(CONVERSATION[1:3], add_generation_prompt=False)


def test_the_family_template_is_used_when_the_tokenizer_has_none(tiny_models):
    tokenizer = load_tokenizer(tiny_models("llama"))
    tokenizer.chat_template = None
    chat = resolve_chat_format(tokenizer, resolve_family("llama"))
    assert chat.name == "llama3"


def test_no_template_anywhere_is_a_clear_error(tiny_models):
    tokenizer = load_tokenizer(tiny_models("llama"))
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="no chat template.*chatml"):
        resolve_chat_format(tokenizer, resolve_family("generic"))


def test_unknown_template_option_is_refused(tiny_models):
    tokenizer = load_tokenizer(tiny_models("qwen3"))
    with pytest.raises(TemplateError, match="no option 'enable_thinkin'"):
        resolve_chat_format(tokenizer, resolve_family("qwen3"), template="qwen3", options={"enable_thinkin": False})


def test_a_template_whose_prompt_does_not_prefix_the_answer_is_refused():
    # Renders the last assistant turn differently from the generation prompt.
    source = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    chat = ChatFormat(source, ("\n",))
    with pytest.raises(TemplateError, match="training prompt would differ"):
        chat.segments(CONVERSATION[1:3])


def test_raise_exception_in_a_template_is_a_template_error():
    chat = ChatFormat("{{ raise_exception('no system turns') }}", ("x",))
    with pytest.raises(TemplateError, match="no system turns"):
        chat.render([], add_generation_prompt=False)
