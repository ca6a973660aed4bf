"""Built-in chat templates: ChatML, the format Qwen and many other open models speak.

Templates are Jinja in the format of a tokenizer's ``chat_template``, so the same text
is rendered at training time by modelloop and at inference time by any engine that
reads the tokenizer. ``chatml_source`` is shared with model plugins whose formats are
ChatML with a default system prompt or thinking blocks (Qwen2.5, Qwen3).
"""

from __future__ import annotations

from modelloop.hooks import hookimpl
from modelloop.specs import ChatTemplate, ToolCallFormat

IM_END = "<|im_end|>"

#: Hermes' tool calls, as ChatML templates write them (Qwen2.5, Qwen3 and many others):
#: ``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>``, one block per call.
HERMES_TOOL_CALLS = ToolCallFormat(pattern=r"<tool_call>\s*(?P<call>\{.*?\})\s*</tool_call>")

_TOOL_CALLS = (
    "{%- for call in message['tool_calls'] or [] %}"
    "{%- set function = call['function'] if call['function'] is defined else call %}"
    "{%- if content or not loop.first %}{{ '\\n' }}{%- endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' + function['name'] + '\", \"arguments\": ' }}"
    "{%- if function['arguments'] is string %}{{ function['arguments'] }}"
    "{%- else %}{{ function['arguments'] | tojson }}{%- endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{%- endfor %}"
)

_EMPTY_THINK = "<think>\\n\\n</think>\\n\\n"


def content_text_macro(image: str, audio: str = "<audio>", video: str = "<video>") -> str:
    """A Jinja macro ``text(content)``: a message's content as text, whether a string or a
    list of parts (text parts as they are, each image part as ``image``, each audio part
    as ``audio``, each video part as ``video``)."""
    return (
        "{%- macro text(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- elif content -%}{%- for part in content -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- elif part['type'] in ('image', 'image_url') -%}{{ '" + image + "' }}"
        "{%- elif part['type'] in ('audio', 'audio_url', 'input_audio') -%}{{ '" + audio + "' }}"
        "{%- elif part['type'] in ('video', 'video_url') -%}{{ '" + video + "' }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
    )


def chatml_source(
    *,
    default_system: str | None = None,
    thinking: bool = False,
    image: str = "<image>",
    audio: str = "<audio>",
    video: str = "<video>",
) -> str:
    """Jinja for ChatML with tool calls and tool responses.

    A message's content is text, or a list of OpenAI-style parts (what processors and
    TRL's vision trainers hand a template): text parts as they are, each image part as
    ``image``, the text a picture stands for in the family's format, each audio part as
    ``audio`` and each video part as ``video``.

    :param default_system: system prompt inserted when the conversation has none.
    :param thinking: honour ``enable_thinking``: when it is false, ``<think>`` blocks are
        stripped from assistant turns and replaced by an empty one, which the generation
        prompt also ends with (Qwen3's non-thinking mode), so training and inference
        prompts stay identical.
    """
    no_thinking = "enable_thinking is defined and not enable_thinking"
    parts = [content_text_macro(image, audio, video)]
    if default_system is not None:
        parts.append(
            "{%- if not messages or messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\n" + default_system + IM_END + "\\n' }}"
            "{%- endif %}"
        )
    parts.append("{%- for message in messages %}")
    parts.append("{%- set content = text(message['content']) %}")
    parts.append("{%- if message['role'] == 'assistant' %}")
    if thinking:
        parts.append(
            "{%- if " + no_thinking + " %}"
            "{%- set content = '" + _EMPTY_THINK + "' + content.split('</think>')[-1].lstrip('\\n') %}"
            "{%- endif %}"
        )
    parts.append("{{ '<|im_start|>assistant\\n' + content }}" + _TOOL_CALLS + "{{ '" + IM_END + "\\n' }}")
    parts.append("{%- elif message['role'] == 'tool' %}")
    parts.append("{{ '<|im_start|>user\\n<tool_response>\\n' + content + '\\n</tool_response>" + IM_END + "\\n' }}")
    parts.append("{%- else %}")
    parts.append("{{ '<|im_start|>' + message['role'] + '\\n' + content + '" + IM_END + "\\n' }}")
    parts.append("{%- endif %}")
    parts.append("{%- endfor %}")
    parts.append("{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}")
    if thinking:
        parts.append("{%- if " + no_thinking + " %}{{ '" + _EMPTY_THINK + "' }}{%- endif %}")
    parts.append("{%- endif %}")
    return "".join(parts)


CHATML = ChatTemplate(
    name="chatml",
    description="ChatML (<|im_start|>role ... <|im_end|>), no default system prompt.",
    source=chatml_source(),
    end_of_turn=(IM_END,),
    tool_calls=HERMES_TOOL_CALLS,
)


@hookimpl
def register_templates(register):
    register(CHATML)
