"""GLM-4 model families: ``glm4`` (GLM-4-9B-0414, GLM-4-32B-0414 and their Z1 siblings)
and ``glm`` (the first GLM-4-9B architecture, as transformers ships it in
THUDM/glm-4-9b-chat-hf).

The chat format is GLM's: ``[gMASK]<sop>``, then each turn opened by its role token,
``<|system|>``, ``<|user|>``, ``<|assistant|>`` or ``<|observation|>`` (a tool's result),
the role token followed by a newline and the text. A tool call is an assistant turn whose
role token is followed by the function's name (GLM's ``metadata``) instead of the newline,
then the arguments as JSON. Tool definitions open the conversation as a system turn.
Canonical (OpenAI-style) messages map onto it: a ``tool`` turn renders as
``<|observation|>``, each of an assistant's ``tool_calls`` as its own call turn.

Where a turn ends. No token closes an assistant turn: the next turn's role token does,
and GLM's generation config stops on ``<|user|>``, ``<|observation|>`` and
``<|endoftext|>``. So the labelled span of an assistant turn runs through the role token
that opens the turn after it: ``<|user|>`` before a user turn, ``<|observation|>`` before
a tool's result, and after the last turn ``<|user|>``, added to the text (nothing follows
it there). That is what the model must emit to stop, and it is how GLM's own fine-tuning
code labels a conversation (the token after each assistant turn is trained, and
``<|user|>`` is appended at the end). The kernel does this for any template whose turn
holds no end-of-turn text while the next turn opens with one (``ChatFormat.segments``);
these templates' ``end_of_turn`` name the three tokens, ``<|user|>`` first.

The two templates differ where the published ones do: GLM-4-0414 (``glm4``) lists tools
under ``# 可用工具`` and writes a space after a call's function name; GLM-4-9B-chat
(``chatglm4``, the ``glm`` family's) opens its tool list with ChatGLM's self-introduction,
and leaves out turns without text. A tokenizer's own template always wins over these.

Facts used here (layer names, released shapes, special tokens, the chat format) are those
of the released models and transformers' GLM classes. Nothing heavy is imported.
"""

from __future__ import annotations

from modelloop.plugin import TINY, ChatTemplate, ModelFamily, TokenizerRecipe, ToolCallFormat, hookimpl

PLUGIN_API = ">=1.6,<2"  # the versions of modelloop.plugin this plugin is written against

#: GLM-4's pre-tokenizer split (digits in groups of up to three), before byte-level BPE.
GLM_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

#: The tokens that end an assistant turn (GLM's generation config stops on all three).
END_OF_TURN = ("<|user|>", "<|observation|>", "<|endoftext|>")

GLM_TOKENIZER = TokenizerRecipe(
    split_regex=GLM_SPLIT,
    nfc=False,
    special_tokens=(
        "<|endoftext|>",
        "[MASK]",
        "[gMASK]",
        "[sMASK]",
        "<sop>",
        "<eop>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|observation|>",
    ),
    eos_token="<|endoftext|>",
    pad_token="<|endoftext|>",
)

#: A call's arguments: as given when already JSON text, else written as JSON.
_ARGUMENTS = (
    "{%- if function['arguments'] is string %}{{ function['arguments'] }}"
    "{%- else %}{{ function['arguments'] | tojson(ensure_ascii=False) }}{%- endif %}"
)


def _calls(after_name: str) -> str:
    """Each of an assistant message's tool calls as a call turn: role token, name, arguments."""
    return (
        "{%- for call in message['tool_calls'] or [] %}"
        "{%- set function = call['function'] if call['function'] is defined else call %}"
        "{{ '<|assistant|>' + function['name'] + '" + after_name + "' }}" + _ARGUMENTS + "{%- endfor %}"
    )


#: A call as ``_calls`` writes it: the name at the start of the turn (or after another
#: call's role token), then its JSON arguments on the next line. An answer starts with a
#: line break instead, so it reads as no call.
GLM_TOOL_CALLS = ToolCallFormat(
    pattern=r"(?:\A|<\|assistant\|>)(?P<name>[^\s<]+) ?\n(?P<arguments>\{.*?\})(?=<\|assistant\|>|<\|observation\|>|<\|user\|>|\s*\Z)"
)

GLM4_TEMPLATE = ChatTemplate(
    name="glm4",
    description="GLM-4-0414: [gMASK]<sop>, role tokens, tools under '# 可用工具', tool results as observations",
    source=(
        "{{ '[gMASK]<sop>' }}"
        "{%- if tools %}{{ '<|system|>\\n# 可用工具\\n' }}"
        "{%- for tool in tools %}"
        "{%- set function = tool['function'] if tool['function'] is defined else tool %}"
        "{{ '\\n## ' + function['name'] + '\\n\\n' + function | tojson(indent=4, ensure_ascii=False) }}"
        "{{ '\\n在调用上述函数时，请使用 Json 格式表示调用的参数。' }}"
        "{%- endfor %}{%- endif %}"
        "{%- for message in messages if message['role'] == 'system' %}"
        "{{ '<|system|>\\n' + message['content'] }}"
        "{%- endfor %}"
        "{%- for message in messages if message['role'] != 'system' %}"
        "{%- if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] }}"
        "{%- elif message['role'] in ('tool', 'observation') %}{{ '<|observation|>\\n' + message['content'] }}"
        "{%- elif message['role'] == 'assistant' %}"
        "{%- if message['metadata'] %}{{ '<|assistant|>' + message['metadata'] + ' \\n' + message['content'] }}"
        "{%- elif message['content'] or not message['tool_calls'] %}{{ '<|assistant|>\\n' + message['content'] }}"
        "{%- endif %}" + _calls(" \\n") + "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|assistant|>' }}{%- endif %}"
    ),
    end_of_turn=END_OF_TURN,
    tool_calls=GLM_TOOL_CALLS,
)

#: GLM-4-9B-chat's tool list: ChatGLM's self-introduction, then each function.
_CHATGLM_TOOLS = (
    "{{ '<|system|>\\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\\n\\n# 可用工具' }}"
    "{%- for tool in listed if tool['type'] == 'function' %}"
    "{{ '\\n## ' + tool['function']['name'] + '\\n\\n' + tool['function'] | tojson(indent=4) }}"
    "{{ '\\n在调用上述函数时，请使用 Json 格式表示调用的参数。' }}"
    "{%- endfor %}"
)

CHATGLM4_TEMPLATE = ChatTemplate(
    name="chatglm4",
    description="GLM-4-9B-chat: [gMASK]<sop>, role tokens, ChatGLM's tool list, tool results as observations",
    source=(
        "{{ '[gMASK]<sop>' }}"
        "{%- if tools %}{%- set listed = tools %}" + _CHATGLM_TOOLS + "{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message['tools'] is defined %}{%- set listed = message['tools'] %}" + _CHATGLM_TOOLS + "{%- endif %}"
        "{%- set role = 'observation' if message['role'] == 'tool' else message['role'] %}"
        "{%- if message['content'] %}"
        "{{ '<|' + role + '|>' + (message['metadata'] or '') + '\\n' + message['content'] }}"
        "{%- endif %}"
        "{%- if role == 'assistant' %}" + _calls("\\n") + "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|assistant|>' }}{%- endif %}"
    ),
    end_of_turn=END_OF_TURN,
    tool_calls=GLM_TOOL_CALLS,
)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
GROUPS = {
    "embeddings": ("model.embed_tokens",),
    "language_model": ("model.layers", "model.norm"),
    "lm_head": ("lm_head",),
}

#: The first GLM-4-9B's shape (THUDM/glm-4-9b-chat-hf); GLM-4-9B-0414 keeps it and adds
#: a norm after attention and after the MLP of each layer.
GLM4_9B = {
    "hidden_size": 4096,
    "intermediate_size": 13696,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "attention_bias": True,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "vocab_size": 151552,
    "tokenizer_vocab": 8000,
}
_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
_TINY = {**TINY, "head_dim": 64, "attention_bias": True}

FAMILIES = (
    ModelFamily(
        name="glm4",
        description="GLM-4-0414 (GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1)",
        model_types=("glm4",),
        aliases=("glm-4-0414",),
        template="glm4",
        lora_targets=TARGETS,
        module_groups=GROUPS,
        presets={
            "tiny": {"model_type": "glm4", **_TINY},
            "glm-4-9b-0414": {
                "model_type": "glm4",
                **GLM4_9B,
                "max_position_embeddings": 32768,
                "rope_parameters": _ROPE,
            },
            "glm-4-32b-0414": {
                "model_type": "glm4",
                **GLM4_9B,
                "hidden_size": 6144,
                "intermediate_size": 23040,
                "num_hidden_layers": 61,
                "num_attention_heads": 48,
                "max_position_embeddings": 32768,
                "rope_parameters": _ROPE,
            },
        },
        tokenizer=GLM_TOKENIZER,
    ),
    ModelFamily(
        name="glm",
        description="GLM-4-9B and its chat model (glm-4-9b-chat-hf)",
        model_types=("glm",),
        template="chatglm4",
        lora_targets=TARGETS,
        module_groups=GROUPS,
        presets={
            "tiny": {"model_type": "glm", **_TINY},
            "glm-4-9b-chat": {
                "model_type": "glm",
                **GLM4_9B,
                "max_position_embeddings": 131072,
                "rope_parameters": {**_ROPE, "rope_theta": 5000000.0},
            },
        },
        tokenizer=GLM_TOKENIZER,
    ),
)


@hookimpl
def register_templates(register):
    register(GLM4_TEMPLATE)
    register(CHATGLM4_TEMPLATE)


@hookimpl
def register_models(register):
    for family in FAMILIES:
        register(family)
