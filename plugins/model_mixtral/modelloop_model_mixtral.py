"""Mixtral: Mistral AI's sparse mixture-of-experts models (Mixtral-8x7B, Mixtral-8x22B).

Each layer's MLP is 8 experts, 2 of them routed per token; transformers fuses the
experts into two parameters, which LoRA targets directly. The chat format and released
shapes are those of the published models; nothing heavy is imported.
"""

from __future__ import annotations

from modelloop.plugin import TINY, ChatTemplate, ModelFamily, TokenizerRecipe, hookimpl

PLUGIN_API = ">=1.1,<2"  # the versions of modelloop.plugin this plugin is written against

#: A byte-level stand-in for Mixtral's SentencePiece vocabulary (digits one by one, as it
#: splits them), for new-model's tiny tokenizers.
MIXTRAL_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

MIXTRAL_TOKENIZER = TokenizerRecipe(
    split_regex=MIXTRAL_SPLIT,
    nfc=False,
    special_tokens=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
    eos_token="</s>",
    bos_token="<s>",
)

#: Mixtral-8x7B-Instruct's format since Mistral AI matched its template to mistral_common:
#: `<s> [INST] user [/INST] answer</s> [INST] ...`, the system prompt (if any) before the
#: first user message, turns strictly alternating, no tools.
MIXTRAL_TEMPLATE = ChatTemplate(
    name="mixtral",
    description="Mixtral instruct: <s> [INST] ... [/INST] answer</s>, system prompt in the first turn; no tools",
    source=(
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
        "{%- else %}{%- set system = none %}{%- set turns = messages %}{%- endif %}"
        "{{- bos_token }}"
        "{%- for message in turns %}"
        "{%- if message['role'] not in ('user', 'assistant') or message['tool_calls'] %}"
        "{{- raise_exception('the mixtral template has no tool turns, only user and assistant ones') }}"
        "{%- elif (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('after the optional system message, turns must alternate user/assistant/...') }}"
        "{%- elif message['role'] == 'user' %}"
        "{{- ' [INST] ' + (system + '\\n\\n' if loop.first and system is not none else '')"
        " + message['content'] + ' [/INST]' }}"
        "{%- else %}{{- ' ' + message['content'] + eos_token }}"
        "{%- endif %}"
        "{%- endfor %}"
    ),
    end_of_turn=("</s>",),
)

FAMILY = ModelFamily(
    name="mixtral",
    description="Mixtral 8x7B and 8x22B (8 experts, 2 routed per token)",
    model_types=("mixtral",),
    template="mixtral",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    lora_target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    module_groups={
        "embeddings": ("model.embed_tokens",),
        "language_model": ("model.layers", "model.norm"),
        "lm_head": ("lm_head",),
    },
    presets={
        "tiny": {
            "model_type": "mixtral",
            **TINY,
            "num_hidden_layers": 2,
            "intermediate_size": 256,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
        },
        "mixtral-8x7b": {
            "model_type": "mixtral",
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-5,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "tokenizer_vocab": 8000,
        },
    },
    tokenizer=MIXTRAL_TOKENIZER,
)


@hookimpl
def register_templates(register):
    register(MIXTRAL_TEMPLATE)


@hookimpl
def register_models(register):
    register(FAMILY)
