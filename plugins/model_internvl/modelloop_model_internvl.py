"""The InternVL family as transformers ships it (``internvl``, e.g. InternVL3-1B-hf): an
InternViT vision tower, an MLP projector over its pixel-shuffled patches, a Qwen2
language model, and the ChatML format of the -hf checkpoints.

A picture is cut into tiles of the tower's size (a grid matching its aspect ratio, plus
a thumbnail of the whole), and each tile becomes ``image_seq_length`` ``<IMG_CONTEXT>``
tokens between ``<img>`` and ``</img>``. Facts used here are those of the released
models and of transformers' InternVL classes; nothing heavy is imported.
"""

from __future__ import annotations

import functools

from modelloop.plugin import IM_END, TINY, ChatTemplate, ModelFamily, TokenizerRecipe, VisionSpec, hookimpl

PLUGIN_API = ">=1.2,<2"  # the versions of modelloop.plugin this plugin is written against

START_IMAGE = "<img>"
END_IMAGE = "</img>"
IMAGE_CONTEXT = "<IMG_CONTEXT>"
VIDEO = "<video>"
#: What the -hf template writes for a picture: the processor's image token, then a newline.
TEMPLATE_IMAGE = IMAGE_CONTEXT + "\n"
#: What one picture is in the text the model reads (its context token repeated per feature).
INTERNVL_IMAGE = f"{START_IMAGE}{IMAGE_CONTEXT}{END_IMAGE}\n"

#: The pre-tokenizer split of InternVL's Qwen2 tokenizer (a fact of that tokenizer, which
#: transformers re-applies, with NFC, to a tokenizer it loads as Qwen2's).
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

INTERNVL_TOKENIZER = TokenizerRecipe(
    split_regex=QWEN2_SPLIT,
    nfc=True,
    special_tokens=("<|endoftext|>", "<|im_start|>", IM_END, START_IMAGE, END_IMAGE, IMAGE_CONTEXT, VIDEO),
    eos_token=IM_END,
    pad_token="<|endoftext|>",
    named_tokens={
        "start_image_token": START_IMAGE,
        "end_image_token": END_IMAGE,
        "context_image_token": IMAGE_CONTEXT,
        "video_token": VIDEO,
    },
)

#: ChatML as the -hf checkpoints publish it: no default system prompt, a picture part as
#: ``<IMG_CONTEXT>`` and a newline (a ``<image>`` mark in text becomes the same, expanded),
#: and neither tool turns nor tool calls, which that template does not write.
INTERNVL_TEMPLATE = ChatTemplate(
    name="internvl",
    description="InternVL -hf ChatML: <|im_start|>role ... <|im_end|>, pictures as <IMG_CONTEXT>",
    source=(
        "{%- for message in messages -%}"
        "{%- if message['role'] not in ('system', 'user', 'assistant') -%}"
        "{{ raise_exception('the internvl template has no ' + message['role'] + ' turns') }}"
        "{%- elif message.get('tool_calls') -%}"
        "{{ raise_exception('the internvl template has no tool calls') }}"
        "{%- endif -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] in ('image', 'image_url') -%}{{ '" + IMAGE_CONTEXT + "\\n' }}"
        "{%- elif part['type'] == 'video' -%}{{ '" + VIDEO + "\\n' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{ '" + IM_END + "\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    end_of_turn=(IM_END,),
)

#: The tiles a picture is cut into, as InternVLProcessor asks the image processor for them.
TILING = {"crop_to_patches": True}


def internvl_image_processor(**options):
    """InternVL's image processor (GOT-OCR 2's): tiles of the tower's size, normalised."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(**options)


def internvl_image_inputs(image_processor, images, model_config):
    """Every tile of every picture in one ``pixel_values`` tensor, in the pictures' order;
    a picture takes ``image_seq_length`` tokens per tile."""
    inputs = image_processor(images=images, **TILING, return_tensors="pt")
    tiles = [int(count) for count in inputs["num_patches"]]
    return {"pixel_values": inputs["pixel_values"]}, [count * model_config.image_seq_length for count in tiles]


def internvl_processor(tokenizer, image_processor, model_config):
    """transformers' InternVLProcessor without its video processor (which needs
    torchvision), a tile taking the model's ``image_seq_length`` tokens."""
    return _image_only_processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=model_config.image_seq_length,
        chat_template=tokenizer.chat_template,
    )


@functools.cache
def _image_only_processor_class():
    from transformers import InternVLProcessor

    class InternVLImageProcessor(InternVLProcessor):
        """Its parts are the image processor and the tokenizer alone (transformers reads a
        processor's parts from its signature)."""

        def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **options):
            super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template, **options)

    return InternVLImageProcessor


INTERNVL_VISION = VisionSpec(
    placeholder=INTERNVL_IMAGE,
    image_token=IMAGE_CONTEXT,
    image_inputs=internvl_image_inputs,
    config_tokens={"image_token_id": IMAGE_CONTEXT},
    image_processor=internvl_image_processor,
    processor=internvl_processor,
)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: 32 x 32 tiles in 8 x 8 patches, pixel-shuffled 2 x 2: 4 tokens a tile, up to 4 tiles
#: and a thumbnail a picture.
TINY_INTERNVL = {
    "model_type": "internvl",
    "text_config": {
        "model_type": "qwen2",
        **{key: value for key, value in TINY.items() if key != "tokenizer_vocab"},
    },
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": [32, 32],
        "patch_size": [8, 8],
        "attention_bias": True,
    },
    "downsample_ratio": 0.5,
    "image_seq_length": 4,
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
    "tie_word_embeddings": True,
    "image_processor": {"size": {"height": 32, "width": 32}, "max_patches": 4},
    "tokenizer_vocab": TINY["tokenizer_vocab"],
}

#: InternVL3-1B-hf: InternViT-300M (448 px, 14 px patches) and Qwen2.5-0.5B with its own
#: output layer; 256 tokens a 448 px tile.
INTERNVL3_1B = {
    "model_type": "internvl",
    "text_config": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "vocab_size": 151674,
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": [448, 448],
        "patch_size": [14, 14],
        "attention_bias": True,
        "use_qk_norm": False,
        "layer_scale_init_value": 0.1,
    },
    "downsample_ratio": 0.5,
    "image_seq_length": 256,
    "tie_word_embeddings": False,
    "image_processor": {
        "size": {"height": 448, "width": 448},
        "max_patches": 12,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    },
    "tokenizer_vocab": 8000,
}

INTERNVL = ModelFamily(
    name="internvl",
    description="InternVL 2.5 / 3 as transformers ships it (InternViT, MLP projector, Qwen2)",
    model_types=("internvl",),
    template="internvl",
    lora_targets=TARGETS,
    module_groups={
        "vision": ("model.vision_tower",),
        "aligner": ("model.multi_modal_projector",),
        "llm": ("model.language_model", "lm_head"),
    },
    vision=INTERNVL_VISION,
    presets={"tiny": TINY_INTERNVL, "internvl3-1b": INTERNVL3_1B},
    tokenizer=INTERNVL_TOKENIZER,
)


@hookimpl
def register_templates(register):
    register(INTERNVL_TEMPLATE)


@hookimpl
def register_models(register):
    register(INTERNVL)
