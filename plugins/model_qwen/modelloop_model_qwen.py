"""Qwen model families: Qwen2 / Qwen2.5, Qwen3, Qwen2-MoE and Qwen3-MoE.

Facts used here (layer names, released shapes, tokenizer pre-tokenizer, chat format)
are those of the released models and of transformers' Qwen classes. Nothing heavy is
imported: everything registered is data, or a function that imports when called.
"""

from __future__ import annotations

import modelloop
from modelloop.models.presets import SMALL, TINY
from modelloop.builtin.templates import IM_END, chatml_source
from modelloop.specs import ChatTemplate, ModelFamily, TokenizerRecipe

#: Qwen2's pre-tokenizer split: letters, single digits, punctuation runs, newlines, spaces.
#: transformers rebuilds any qwen2-type tokenizer with it (plus NFC), so new-model must train with it.
QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

QWEN_TOKENIZER = TokenizerRecipe(
    split_regex=QWEN_SPLIT,
    nfc=True,
    special_tokens=("<|endoftext|>", "<|im_start|>", IM_END),
    eos_token=IM_END,
    pad_token="<|endoftext|>",
)
QWEN3_TOKENIZER = TokenizerRecipe(
    split_regex=QWEN_SPLIT,
    nfc=True,
    special_tokens=("<|endoftext|>", "<|im_start|>", IM_END, "<think>", "</think>"),
    eos_token=IM_END,
    pad_token="<|endoftext|>",
)

DENSE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
LANGUAGE_MODEL = {"embeddings": ("model.embed_tokens",), "language_model": ("model.layers", "model.norm"), "lm_head": ("lm_head",)}

TINY_MOE = {**TINY, "num_hidden_layers": 2, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128}

QWEN2_TEMPLATE = ChatTemplate(
    name="qwen2",
    description="Qwen2/Qwen2.5 ChatML, default system prompt, tool calls",
    source=chatml_source(default_system="You are a helpful assistant."),
    end_of_turn=(IM_END,),
)
QWEN3_TEMPLATE = ChatTemplate(
    name="qwen3",
    description="Qwen3 ChatML; enable_thinking=false strips <think> blocks",
    source=chatml_source(thinking=True),
    end_of_turn=(IM_END,),
    options={"enable_thinking": True},
)

FAMILIES = (
    ModelFamily(
        name="qwen2",
        description="Qwen2 and Qwen2.5",
        model_types=("qwen2",),
        aliases=("qwen2.5",),
        template="qwen2",
        lora_targets=DENSE_TARGETS,
        module_groups=LANGUAGE_MODEL,
        presets={
            "tiny": {"model_type": "qwen2", **TINY, "max_window_layers": 4},
            "small": {"model_type": "qwen2", **SMALL, "max_window_layers": 8},
            "qwen2.5-0.5b": {
                "model_type": "qwen2",
                "hidden_size": 896,
                "intermediate_size": 4864,
                "num_hidden_layers": 24,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "max_position_embeddings": 32768,
                "rope_theta": 1000000.0,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": True,
                "vocab_size": 151936,
                "tokenizer_vocab": 8000,
            },
            "qwen2.5-1.5b": {
                "model_type": "qwen2",
                "hidden_size": 1536,
                "intermediate_size": 8960,
                "num_hidden_layers": 28,
                "num_attention_heads": 12,
                "num_key_value_heads": 2,
                "max_position_embeddings": 32768,
                "rope_theta": 1000000.0,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": True,
                "vocab_size": 151936,
                "tokenizer_vocab": 8000,
            },
        },
        tokenizer=QWEN_TOKENIZER,
    ),
    ModelFamily(
        name="qwen3",
        description="Qwen3 (dense)",
        model_types=("qwen3",),
        template="qwen3",
        lora_targets=DENSE_TARGETS,
        module_groups=LANGUAGE_MODEL,
        presets={
            "tiny": {"model_type": "qwen3", **TINY, "head_dim": 64},
            "qwen3-0.6b": {
                "model_type": "qwen3",
                "hidden_size": 1024,
                "intermediate_size": 3072,
                "num_hidden_layers": 28,
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "max_position_embeddings": 40960,
                "rope_theta": 1000000.0,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": True,
                "vocab_size": 151936,
                "tokenizer_vocab": 8000,
            },
        },
        tokenizer=QWEN3_TOKENIZER,
    ),
    ModelFamily(
        name="qwen2_moe",
        description="Qwen1.5-MoE / Qwen2-MoE (shared expert + routed experts)",
        model_types=("qwen2_moe",),
        template="qwen2",
        lora_targets=DENSE_TARGETS,
        lora_target_parameters=EXPERT_PARAMETERS,
        module_groups=LANGUAGE_MODEL,
        moe_experts=("mlp.experts",),
        presets={"tiny": {"model_type": "qwen2_moe", **TINY_MOE, "shared_expert_intermediate_size": 256}},
        tokenizer=QWEN_TOKENIZER,
    ),
    ModelFamily(
        name="qwen3_moe",
        description="Qwen3-MoE (routed experts)",
        model_types=("qwen3_moe",),
        template="qwen3",
        lora_targets=DENSE_TARGETS,
        lora_target_parameters=EXPERT_PARAMETERS,
        module_groups=LANGUAGE_MODEL,
        moe_experts=("mlp.experts",),
        presets={"tiny": {"model_type": "qwen3_moe", **TINY_MOE, "head_dim": 64}},
        tokenizer=QWEN3_TOKENIZER,
    ),
)


@modelloop.hookimpl
def register_templates(register):
    register(QWEN2_TEMPLATE)
    register(QWEN3_TEMPLATE)


@modelloop.hookimpl
def register_models(register):
    for family in FAMILIES:
        register(family)
