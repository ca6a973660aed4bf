"""The LLaVA family (transformers' ``llava``): a CLIP vision tower, a two-layer projector
into a Llama language model, and the LLaVA-1.5 chat format.

Each image becomes ``image_seq_length`` copies of ``<image>`` in the text (the vision
tower's patches, its class token left out), and the processor's ``pixel_values`` carry
the images in the order their tokens come. Nothing heavy is imported here.
"""

from __future__ import annotations

from modelloop.plugin import TINY, ChatTemplate, ModelFamily, TokenizerRecipe, VisionSpec, content_text_macro, hookimpl
from modelloop_model_llama import LLAMA3_SPLIT, TARGETS

PLUGIN_API = ">=1.0,<2"  # the versions of modelloop.plugin this plugin is written against

IMAGE = "<image>"

LLAVA_TEMPLATE = ChatTemplate(
    name="llava",
    description="LLaVA-1.5: USER: ... ASSISTANT: ...</s>, the system prompt first",
    source=(
        "{{ bos_token }}" + content_text_macro(IMAGE) + "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}{{ text(message['content']) + ' ' }}"
        "{%- elif message['role'] == 'user' %}{{ 'USER: ' + text(message['content']) + ' ' }}"
        "{%- elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + text(message['content']) + eos_token }}"
        "{%- else %}{{ raise_exception('the llava template has no ' + message['role'] + ' turns') }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ 'ASSISTANT:' }}{%- endif %}"
    ),
    end_of_turn=("</s>",),
)

LLAVA_TOKENIZER = TokenizerRecipe(
    split_regex=LLAMA3_SPLIT,
    nfc=False,
    special_tokens=("<unk>", "<s>", "</s>", "<pad>", IMAGE),
    eos_token="</s>",
    pad_token="<pad>",
    bos_token="<s>",
)


def clip_image_processor(**options):
    """CLIP's image processor: shortest edge resized, centre crop, normalised."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**options)


def llava_processor(tokenizer, image_processor, model_config):
    """transformers' LlavaProcessor, counting a picture's tokens as the model does."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=model_config.vision_config.patch_size,
        vision_feature_select_strategy=model_config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=tokenizer.chat_template,
    )


def llava_image_inputs(image_processor, images, model_config):
    """One ``pixel_values`` tensor for the images; each takes ``image_seq_length`` tokens."""
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixels}, [model_config.image_seq_length] * len(images)


LLAVA_VISION = VisionSpec(
    placeholder=IMAGE,
    image_token=IMAGE,
    image_inputs=llava_image_inputs,
    config_tokens={"image_token_index": IMAGE},
    image_processor=clip_image_processor,
    processor=llava_processor,
)

#: 32 x 32 pictures in 8 x 8 patches: 16 image tokens each.
TINY_LLAVA = {
    "model_type": "llava",
    "text_config": {"model_type": "llama", **{key: value for key, value in TINY.items() if key != "tokenizer_vocab"}},
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        "projection_dim": 64,
    },
    "image_seq_length": 16,
    "vision_feature_select_strategy": "default",
    "vision_feature_layer": -1,  # the last layer: every vision weight reaches the loss
    "tie_word_embeddings": True,
    "image_processor": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
    "tokenizer_vocab": TINY["tokenizer_vocab"],
}

LLAVA = ModelFamily(
    name="llava",
    description="LLaVA / LLaVA-1.5 (CLIP vision tower, MLP projector, Llama)",
    model_types=("llava",),
    template="llava",
    lora_targets=TARGETS,
    module_groups={
        "vision": ("model.vision_tower",),
        "aligner": ("model.multi_modal_projector",),
        "llm": ("model.language_model", "lm_head"),
    },
    vision=LLAVA_VISION,
    presets={"tiny": TINY_LLAVA},
    tokenizer=LLAVA_TOKENIZER,
)


@hookimpl
def register_templates(register):
    register(LLAVA_TEMPLATE)


@hookimpl
def register_models(register):
    register(LLAVA)
