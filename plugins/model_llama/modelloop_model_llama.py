"""Llama and Mistral model families.

The chat formats and released shapes are those of Meta's and Mistral AI's published
models; nothing heavy is imported here.
"""

from __future__ import annotations

from modelloop.plugin import TINY, ChatTemplate, ModelFamily, TokenizerRecipe, ToolCallFormat, hookimpl

PLUGIN_API = ">=1.6,<2"  # the versions of modelloop.plugin this plugin is written against

#: Llama 3's pre-tokenizer split (digits in groups of up to three).
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
EOT = "<|eot_id|>"

LLAMA3_TEMPLATE = ChatTemplate(
    name="llama3",
    description="Llama 3.x headers; <|eot_id|> ends a turn; tool results as ipython turns",
    source=(
        "{{ bos_token }}"
        "{%- for message in messages %}"
        "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
        "{{ '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + (message['content'] or '') | trim }}"
        "{%- for call in message['tool_calls'] or [] %}"
        "{%- set function = call['function'] if call['function'] is defined else call %}"
        "{{ '{\"name\": \"' + function['name'] + '\", \"parameters\": ' }}"
        "{%- if function['arguments'] is string %}{{ function['arguments'] }}"
        "{%- else %}{{ function['arguments'] | tojson }}{%- endif %}{{ '}' }}"
        "{%- endfor %}"
        "{{ '" + EOT + "' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    end_of_turn=(EOT,),
    # a call is a JSON object with "name" and "parameters", the whole of its turn (or one of several)
    tool_calls=ToolCallFormat(
        pattern=r'(?P<call>\{\s*"name"\s*:.*?\})(?=\s*(?:\{\s*"name"|<\|eot_id\|>|<\|eom_id\|>|\Z))',
        arguments_key="parameters",
    ),
)


def _inst_template(name: str, description: str, *, system_block: bool) -> ChatTemplate:
    """Llama 2 and Mistral: [INST] user [/INST] answer</s>, the system prompt folded into the first user turn."""
    system = "'<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n'" if system_block else "system + '\\n\\n'"
    bos_each_turn = "bos_token + " if system_block else ""
    return ChatTemplate(
        name=name,
        description=description,
        source=(
            "{%- if messages and messages[0]['role'] == 'system' %}"
            "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
            "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
            + ("" if system_block else "{{ bos_token }}")
            + "{%- for message in turns %}"
            "{%- if message['role'] == 'user' %}"
            "{%- set content = ("
            + system
            + " + message['content']) if loop.first and system else message['content'] %}"
            "{{ " + bos_each_turn + "'[INST] ' + content | trim + ' [/INST]' }}"
            "{%- elif message['role'] == 'assistant' %}"
            "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
            "{%- else %}{{ raise_exception('the " + name + " template has no ' + message['role'] + ' turns') }}"
            "{%- endif %}"
            "{%- endfor %}"
        ),
        end_of_turn=("</s>",),
    )


LLAMA2_TEMPLATE = _inst_template("llama2", "Llama 2 chat: [INST] with a <<SYS>> block", system_block=True)
MISTRAL_TEMPLATE = _inst_template("mistral", "Mistral instruct: [INST] ... [/INST]", system_block=False)

LLAMA3_TOKENIZER = TokenizerRecipe(
    split_regex=LLAMA3_SPLIT,
    nfc=False,
    special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOT),
    eos_token=EOT,
    pad_token="<|end_of_text|>",
    bos_token="<|begin_of_text|>",
)
MISTRAL_TOKENIZER = TokenizerRecipe(
    split_regex=LLAMA3_SPLIT,
    nfc=False,
    special_tokens=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
    eos_token="</s>",
    bos_token="<s>",
)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUPS = {
    "embeddings": ("model.embed_tokens",),
    "language_model": ("model.layers", "model.norm"),
    "lm_head": ("lm_head",),
}

FAMILIES = (
    ModelFamily(
        name="llama",
        description="Llama 2, 3, 3.1, 3.2",
        model_types=("llama",),
        template="llama3",
        lora_targets=TARGETS,
        module_groups=GROUPS,
        presets={
            "tiny": {"model_type": "llama", **TINY},
            "llama-3.2-1b": {
                "model_type": "llama",
                "hidden_size": 2048,
                "intermediate_size": 8192,
                "num_hidden_layers": 16,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 64,
                "max_position_embeddings": 131072,
                "rope_theta": 500000.0,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 32.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": True,
                "vocab_size": 128256,
                "tokenizer_vocab": 8000,
            },
        },
        tokenizer=LLAMA3_TOKENIZER,
    ),
    ModelFamily(
        name="mistral",
        description="Mistral 7B and its instruct versions",
        model_types=("mistral",),
        template="mistral",
        lora_targets=TARGETS,
        module_groups=GROUPS,
        presets={"tiny": {"model_type": "mistral", **TINY, "sliding_window": None}},
        tokenizer=MISTRAL_TOKENIZER,
    ),
)


@hookimpl
def register_templates(register):
    for template in (LLAMA3_TEMPLATE, LLAMA2_TEMPLATE, MISTRAL_TEMPLATE):
        register(template)


@hookimpl
def register_models(register):
    for family in FAMILIES:
        register(family)
