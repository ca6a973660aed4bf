"""Gemma model families: Gemma 2 (``gemma2``), Gemma 3's text models (``gemma3_text``,
the 270M and 1B) and the Gemma 3 vision-language model (``gemma3``: a SigLIP tower, a
projector that pools its patches into the language model's width, a Gemma 3 language
model), with Gemma's chat format.

Facts used here (layer names, released shapes, special tokens, chat format) are those
of the released models and of transformers' Gemma classes. Nothing heavy is imported:
everything registered is data, or a function that imports when called.
"""

from __future__ import annotations

from modelloop.plugin import TINY, ChatTemplate, ModelFamily, TokenizerRecipe, VisionSpec, hookimpl

PLUGIN_API = ">=1.2,<2"  # the versions of modelloop.plugin this plugin is written against

END_OF_TURN = "<end_of_turn>"
#: Where a picture starts in Gemma 3's chat text; its processor puts the picture's
#: ``<image_soft_token>`` run, ``<end_of_image>`` and blank lines around it.
START_OF_IMAGE = "<start_of_image>"
IMAGE_TOKEN = "<image_soft_token>"
END_OF_IMAGE = "<end_of_image>"
#: What one picture is in the text the model reads (the soft token repeated per feature).
GEMMA_IMAGE = f"\n\n{START_OF_IMAGE}{IMAGE_TOKEN}{END_OF_IMAGE}\n\n"

#: Gemma's tokenizer is a SentencePiece BPE that splits digits one by one and letters from
#: punctuation, with a space kept on the piece after it; new-model trains a byte-level BPE
#: split the same way (transformers keeps it as saved: it rebuilds no Gemma tokenizer).
GEMMA_SPLIT = r""" ?\p{L}+| ?[^\s\p{L}\p{N}]+|\p{N}|\s+(?!\S)|\s+"""

_GEMMA_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", END_OF_TURN)

GEMMA2_TOKENIZER = TokenizerRecipe(
    split_regex=GEMMA_SPLIT,
    nfc=False,
    special_tokens=_GEMMA_SPECIAL,
    eos_token="<eos>",
    pad_token="<pad>",
    bos_token="<bos>",
)
#: Gemma 3's tokenizer (the text models' too) holds the picture tokens, named as its
#: processor reads them.
GEMMA3_TOKENIZER = TokenizerRecipe(
    split_regex=GEMMA_SPLIT,
    nfc=False,
    special_tokens=(*_GEMMA_SPECIAL, START_OF_IMAGE, END_OF_IMAGE, IMAGE_TOKEN),
    eos_token="<eos>",
    pad_token="<pad>",
    bos_token="<bos>",
    named_tokens={"boi_token": START_OF_IMAGE, "eoi_token": END_OF_IMAGE, "image_token": IMAGE_TOKEN},
)

#: A message's text as Gemma's template writes it: trimmed, and each text part trimmed on
#: its own, so text around an ``<image>`` mark (a picture part of the message) is trimmed
#: as the parts are.
_TEXT = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content.split('<image>') | map('trim') | join('<image>') }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{{ '" + START_OF_IMAGE + "' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

GEMMA_TEMPLATE = ChatTemplate(
    name="gemma",
    description="Gemma 2 and 3: <start_of_turn>user / model ... <end_of_turn>, the system prompt opening the first user turn",
    source=(
        "{{ bos_token }}" + _TEXT + "{%- set ns = namespace(prefix='') -%}"
        "{%- set turns = messages -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set first = messages[0]['content'] -%}"
        "{%- set ns.prefix = (first if first is string else first[0]['text']) + '\\n\\n' -%}"
        "{%- set turns = messages[1:] -%}"
        "{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if message['role'] not in ('user', 'assistant') -%}"
        "{{ raise_exception('the gemma template has no ' + message['role'] + ' turns') }}"
        "{%- elif message.get('tool_calls') -%}"
        "{{ raise_exception('the gemma template has no tool calls') }}"
        "{%- elif (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{%- endif -%}"
        "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' }}"
        "{%- if loop.first -%}{{ ns.prefix }}{%- endif -%}"
        "{{ text(message['content']) + '" + END_OF_TURN + "\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
    ),
    end_of_turn=(END_OF_TURN,),
)


def gemma3_image_processor(**options):
    """Gemma 3's image processor: resized to the tower's square, rescaled, normalised
    (without pan and scan: one crop a picture, as the processor does by default)."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(**options)


def gemma3_image_inputs(image_processor, images, model_config):
    """One ``pixel_values`` tensor for the pictures; the projector pools each into
    ``mm_tokens_per_image`` soft tokens."""
    pixels = image_processor(images=images, do_pan_and_scan=False, return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixels}, [model_config.mm_tokens_per_image] * len(images)


def gemma3_processor(tokenizer, image_processor, model_config):
    """transformers' Gemma3Processor, a picture taking the model's ``mm_tokens_per_image``."""
    from transformers import Gemma3Processor

    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=model_config.mm_tokens_per_image,
        chat_template=tokenizer.chat_template,
    )


GEMMA3_VISION = VisionSpec(
    placeholder=GEMMA_IMAGE,
    image_token=IMAGE_TOKEN,
    image_inputs=gemma3_image_inputs,
    token_types="token_type_ids",  # image tokens attend to their whole picture, as in Gemma 3's training
    config_tokens={
        "boi_token_index": START_OF_IMAGE,
        "eoi_token_index": END_OF_IMAGE,
        "image_token_index": IMAGE_TOKEN,
    },
    image_processor=gemma3_image_processor,
    processor=gemma3_processor,
)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LANGUAGE_MODEL = {
    "embeddings": ("model.embed_tokens",),
    "language_model": ("model.layers", "model.norm"),
    "lm_head": ("lm_head",),
}

_TEXT_TINY = {key: value for key, value in TINY.items() if key != "tokenizer_vocab"}
#: TINY with Gemma's own parts: 64-wide heads scaled by their width, a 32-token sliding
#: window on the first three layers (the last attends to everything), tied embeddings.
_GEMMA_TINY = {
    **_TEXT_TINY,
    "head_dim": 64,
    "query_pre_attn_scalar": 64,
    "sliding_window": 32,
    "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
}

#: SigLIP so400m at 896 px in 14 px patches, as in every Gemma 3 model that reads pictures.
_SIGLIP_SO400M = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "vision_use_head": False,
}

FAMILIES = (
    ModelFamily(
        name="gemma2",
        description="Gemma 2 (soft-capped attention and logits, alternating sliding windows)",
        model_types=("gemma2",),
        template="gemma",
        lora_targets=TARGETS,
        module_groups=LANGUAGE_MODEL,
        presets={
            "tiny": {"model_type": "gemma2", **_GEMMA_TINY, "tokenizer_vocab": TINY["tokenizer_vocab"]},
            "gemma-2-2b": {
                "model_type": "gemma2",
                "hidden_size": 2304,
                "intermediate_size": 9216,
                "num_hidden_layers": 26,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
                "head_dim": 256,
                "query_pre_attn_scalar": 256,
                "sliding_window": 4096,
                "max_position_embeddings": 8192,
                "rope_theta": 10000.0,
                "final_logit_softcapping": 30.0,
                "attn_logit_softcapping": 50.0,
                "tie_word_embeddings": True,
                "vocab_size": 256000,
                "tokenizer_vocab": 8000,
            },
        },
        tokenizer=GEMMA2_TOKENIZER,
    ),
    ModelFamily(
        name="gemma3_text",
        description="Gemma 3 text models (270M, 1B): five sliding-window layers to one global",
        model_types=("gemma3_text",),
        template="gemma",
        lora_targets=TARGETS,
        module_groups=LANGUAGE_MODEL,
        presets={
            "tiny": {"model_type": "gemma3_text", **_GEMMA_TINY, "tokenizer_vocab": TINY["tokenizer_vocab"]},
            "gemma-3-1b": {
                "model_type": "gemma3_text",
                "hidden_size": 1152,
                "intermediate_size": 6912,
                "num_hidden_layers": 26,
                "num_attention_heads": 4,
                "num_key_value_heads": 1,
                "head_dim": 256,
                "query_pre_attn_scalar": 256,
                "sliding_window": 512,
                "max_position_embeddings": 32768,
                "rope_theta": 1000000.0,
                "rope_local_base_freq": 10000.0,
                "tie_word_embeddings": True,
                "vocab_size": 262144,
                "tokenizer_vocab": 8000,
            },
        },
        tokenizer=GEMMA3_TOKENIZER,
    ),
    ModelFamily(
        name="gemma3",
        description="Gemma 3 vision-language (SigLIP tower, pooling projector, Gemma 3)",
        model_types=("gemma3",),
        template="gemma",
        lora_targets=TARGETS,
        module_groups={
            "vision": ("model.vision_tower",),
            "aligner": ("model.multi_modal_projector",),
            "llm": ("model.language_model", "lm_head"),
        },
        vision=GEMMA3_VISION,
        presets={
            #: 32 x 32 pictures in 8 x 8 patches, pooled 2 x 2 into 4 soft tokens each.
            "tiny": {
                "model_type": "gemma3",
                "text_config": _GEMMA_TINY,
                "vision_config": {
                    "model_type": "siglip_vision_model",
                    "hidden_size": 64,
                    "intermediate_size": 128,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "image_size": 32,
                    "patch_size": 8,
                    "vision_use_head": False,
                },
                "mm_tokens_per_image": 4,
                "tie_word_embeddings": True,
                "image_processor": {"size": {"height": 32, "width": 32}},
                "tokenizer_vocab": TINY["tokenizer_vocab"],
            },
            "gemma-3-4b": {
                "model_type": "gemma3",
                "text_config": {
                    "hidden_size": 2560,
                    "intermediate_size": 10240,
                    "num_hidden_layers": 34,
                    "num_attention_heads": 8,
                    "num_key_value_heads": 4,
                    "head_dim": 256,
                    "query_pre_attn_scalar": 256,
                    "sliding_window": 1024,
                    "max_position_embeddings": 131072,
                    "rope_parameters": {
                        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    },
                    "vocab_size": 262208,
                },
                "vision_config": _SIGLIP_SO400M,
                "mm_tokens_per_image": 256,
                "tie_word_embeddings": True,
                "image_processor": {"size": {"height": 896, "width": 896}},
                "tokenizer_vocab": 8000,
            },
        },
        tokenizer=GEMMA3_TOKENIZER,
    ),
)


@hookimpl
def register_templates(register):
    register(GEMMA_TEMPLATE)


@hookimpl
def register_models(register):
    for family in FAMILIES:
        register(family)
