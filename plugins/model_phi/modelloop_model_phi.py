"""Phi model family: Phi-3, Phi-3.5 and Phi-4 (transformers' ``phi3`` model type, which
all of them use).

Two chat formats share the model type:

- ``phi3`` (the family's default): ``<|system|>``, ``<|user|>``, ``<|assistant|>``, each
  followed by a newline, the text, ``<|end|>`` and a newline; ``<|end|>`` ends an
  assistant turn and is trained. Rendered without a generation prompt, the conversation
  ends with ``<|endoftext|>``, as the published Phi-3 template writes it (not trained).
- ``phi4``: ``<|im_start|>ROLE<|im_sep|>text<|im_end|>``, with nothing between turns;
  ``<|im_end|>`` ends an assistant turn.

A Phi-4 checkpoint's tokenizer carries its own template, which wins over the family's;
a Phi-4 model whose tokenizer has none (a folder built by ``modelloop new-model phi3
--preset phi-4``, a tokenizer saved without it) takes ``--template phi4`` (config:
``template: phi4``), and so does one whose turns should stop at ``<|im_end|>`` when
served. Neither published template has tool turns: these refuse a tool turn or an
assistant's tool calls rather than drop them.

Facts used here (layer names, released shapes, special tokens, chat formats) are those of
Microsoft's released models and transformers' Phi-3 classes. Nothing heavy is imported.
"""

from __future__ import annotations

from modelloop.plugin import TINY, ChatTemplate, ModelFamily, TokenizerRecipe, hookimpl

PLUGIN_API = ">=1.1,<2"  # the versions of modelloop.plugin this plugin is written against

#: The split of the tiny tokenizers new-model trains (digits in groups of up to three).
PHI_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

#: Phi-3's special tokens, then Phi-4's chat tokens, so either template tokenises.
PHI_TOKENIZER = TokenizerRecipe(
    split_regex=PHI_SPLIT,
    nfc=False,
    special_tokens=(
        "<unk>",
        "<s>",
        "</s>",
        "<|endoftext|>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
        "<|im_start|>",
        "<|im_sep|>",
        "<|im_end|>",
    ),
    eos_token="<|endoftext|>",
    pad_token="<|endoftext|>",
    bos_token="<s>",
)

#: Neither published format has tool turns: refuse them instead of leaving them out.
_NO_TOOLS = (
    "{%- if message['role'] not in ('system', 'user', 'assistant') or message['tool_calls'] %}"
    "{{ raise_exception('the {name} template has no tool turns or tool calls') }}"
    "{%- endif %}"
)

PHI3_TEMPLATE = ChatTemplate(
    name="phi3",
    description="Phi-3/3.5: <|user|>\\n...<|end|>\\n; <|end|> ends a turn",
    source=(
        "{%- for message in messages %}"
        + _NO_TOOLS.replace("{name}", "phi3")
        + "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- else %}{{ '<|endoftext|>' }}{%- endif %}"
    ),
    end_of_turn=("<|end|>",),
)

PHI4_TEMPLATE = ChatTemplate(
    name="phi4",
    description="Phi-4: <|im_start|>role<|im_sep|>...<|im_end|>; <|im_end|> ends a turn",
    source=(
        "{%- for message in messages %}"
        + _NO_TOOLS.replace("{name}", "phi4")
        + "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{%- endif %}"
    ),
    end_of_turn=("<|im_end|>",),
)

PHI3_MINI = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "vocab_size": 32064,
    "tokenizer_vocab": 8000,
}

FAMILY = ModelFamily(
    name="phi3",
    description="Phi-3, Phi-3.5 and Phi-4",
    model_types=("phi3",),
    aliases=("phi-3", "phi-3.5"),
    template="phi3",
    lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    module_groups={
        "embeddings": ("model.embed_tokens",),
        "language_model": ("model.layers", "model.norm"),
        "lm_head": ("lm_head",),
    },
    presets={
        "tiny": {"model_type": "phi3", **TINY},
        "phi-3-mini-4k": {
            "model_type": "phi3",
            **PHI3_MINI,
            "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096,
            "sliding_window": 2047,
            "rope_theta": 10000.0,
        },
        "phi-4": {
            "model_type": "phi3",
            **PHI3_MINI,
            "hidden_size": 5120,
            "intermediate_size": 17920,
            "num_hidden_layers": 40,
            "num_attention_heads": 40,
            "num_key_value_heads": 10,
            "max_position_embeddings": 16384,
            "original_max_position_embeddings": 16384,
            "rope_theta": 250000.0,
            "vocab_size": 100352,
        },
    },
    tokenizer=PHI_TOKENIZER,
)


@hookimpl
def register_templates(register):
    register(PHI3_TEMPLATE)
    register(PHI4_TEMPLATE)


@hookimpl
def register_models(register):
    register(FAMILY)
