"""Qwen model families: Qwen2 / Qwen2.5, Qwen3, Qwen2-MoE, Qwen3-MoE, the
vision-language Qwen2-VL, Qwen2.5-VL and Qwen3-VL, the audio-language Qwen2-Audio, and
Qwen2.5-Omni's thinker, which takes pictures, video and sound.

Facts used here (layer names, released shapes, tokenizer pre-tokenizer, chat format)
are those of the released models and of transformers' Qwen classes. Nothing heavy is
imported: everything registered is data, or a function that imports when called.
"""

from __future__ import annotations

import dataclasses
import functools

from modelloop.plugin import (
    HERMES_TOOL_CALLS,
    IM_END,
    SMALL,
    TINY,
    AudioSpec,
    ChatTemplate,
    ModelFamily,
    TokenizerRecipe,
    VideoSpec,
    VisionSpec,
    chatml_source,
    hookimpl,
)

PLUGIN_API = ">=1.7,<2"  # the versions of modelloop.plugin this plugin is written against

#: Qwen2's pre-tokenizer split: letters, single digits, punctuation runs, newlines, spaces.
#: transformers rebuilds any qwen2-type tokenizer with it (plus NFC), so new-model must train with it.
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

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

#: What one picture is in Qwen-VL's chat text (its image token repeated per feature).
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
#: What one video is (its video token repeated per feature; Qwen3-VL: per time step).
QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"

QWEN_VL_TOKENIZER = TokenizerRecipe(
    split_regex=QWEN_SPLIT,
    nfc=True,
    special_tokens=(
        "<|endoftext|>",
        "<|im_start|>",
        IM_END,
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ),
    eos_token=IM_END,
    pad_token="<|endoftext|>",
)

DENSE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
LANGUAGE_MODEL = {
    "embeddings": ("model.embed_tokens",),
    "language_model": ("model.layers", "model.norm"),
    "lm_head": ("lm_head",),
}

#: The vision families' parts: the ViT, the merger that maps its patches into the
#: language model's width (Qwen3-VL's deepstack mergers too), and the language model.
VL_GROUPS = {
    "vision": ("model.visual",),
    "aligner": ("model.visual.merger", "model.visual.deepstack_merger_list"),
    "llm": ("model.language_model", "lm_head"),
}


def qwen_image_processor(**options):
    """Qwen-VL's image processor: resize to multiples of patch x merge within a pixel budget
    (``size``: ``shortest_edge`` = min pixels, ``longest_edge`` = max pixels), then patches."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**options)


def qwen_image_inputs(image_processor, images, model_config):
    """Patches of every image, concatenated, with each image's (t, h, w) grid; an image
    takes one token per ``merge_size`` x ``merge_size`` patches."""
    inputs = image_processor(images=images, return_tensors="pt")
    counts = (inputs["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist()
    return {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}, counts


def qwen_processor(tokenizer, image_processor, model_config):
    """Qwen-VL's processor for pictures (the same expansion of its image token in all three
    versions), without the video processor, which needs torchvision."""
    return _image_only_processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


@functools.cache
def _image_only_processor_class():
    from transformers import Qwen2VLProcessor

    class QwenImageProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **options):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **options)

    return QwenImageProcessor


def qwen_rope_index(model, input_ids, token_types, inputs):
    """Qwen-VL's multimodal rotary positions (temporal, height, width) of one example,
    its pictures and videos placed by their grids (Qwen2.5-VL's videos by their seconds
    per grid too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    timing = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    positions, _ = base.model.get_rope_index(
        input_ids,
        token_types,
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        **timing,
    )
    return positions


def qwen_video_inputs(image_processor, videos, model_config, options, *, timing, seconds_input="second_per_grid_ts"):
    """Each video's frames resized alike within the video pixel budget (``options["size"]``)
    by the image processor, then taken in time steps: a patch holds
    ``temporal_patch_size`` consecutive frames (the last repeated to fill the last step),
    laid out as the image processor lays out a picture, which is one frame repeated. One
    token per ``merge_size`` x ``merge_size`` patches of a step.

    ``timing`` is how the version tells the model when the frames were taken:
    ``"none"`` (Qwen2-VL), ``"grid_seconds"`` (the seconds a step spans, in the model
    input ``seconds_input``: Qwen2.5-VL's ``second_per_grid_ts``, Qwen2.5-Omni's
    ``video_second_per_grid``), ``"timestamps"`` (Qwen3-VL writes each step's time in the
    text, ``<0.5 seconds>``, before that step's tokens between vision marks)."""
    import torch

    step, merge = image_processor.temporal_patch_size, image_processor.merge_size
    pixels, grids, seconds, expansions = [], [], [], []
    for video in videos:
        frames = list(video.frames) + [video.frames[-1]] * (-len(video.frames) % step)
        times = list(video.timestamps) + [video.timestamps[-1]] * (-len(video.timestamps) % step)
        processed = image_processor(images=frames, size=dict(options["size"]), return_tensors="pt")
        _, height, width = (int(value) for value in processed["image_grid_thw"][0])
        steps = len(frames) // step
        # (frames, patches, channels, step copies, pixels): each frame's first copy, a step's frames side by side
        copies = processed["pixel_values"].view(len(frames), height * width, -1, step, image_processor.patch_size**2)
        paired = copies[:, :, :, 0].reshape(steps, step, height * width, copies.shape[2], -1).permute(0, 2, 3, 1, 4)
        pixels.append(paired.reshape(steps * height * width, -1))
        grids.append([steps, height, width])
        seconds.append(step / video.fps)
        tokens = height * width // merge**2
        if timing == "timestamps":
            middles = [sum(times[start : start + step]) / step for start in range(0, len(times), step)]
            expansions.append(
                "".join(
                    f"<{middle:.1f} seconds><|vision_start|>" + "<|video_pad|>" * tokens + "<|vision_end|>"
                    for middle in middles
                )
            )
        else:
            expansions.append(steps * tokens)
    inputs = {"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grids)}
    if timing == "grid_seconds":
        inputs[seconds_input] = torch.tensor(seconds)
    return inputs, expansions


def qwen_video_options(patch_size: int) -> dict:
    """The released models' video processor defaults: 2 frames a second, 4 to 768 of
    them, each within 128 to 768 tokens' worth of pixels."""
    unit = (patch_size * 2) ** 2
    return {
        "fps": 2.0,
        "min_frames": 4,
        "max_frames": 768,
        "temporal_patch_size": 2,
        "size": {"shortest_edge": 128 * unit, "longest_edge": 768 * unit},
    }


def qwen_vision(timing: str, patch_size: int) -> VisionSpec:
    """Qwen-VL's pictures and videos; ``timing`` as ``qwen_video_inputs`` takes it."""
    return VisionSpec(
        placeholder=QWEN_IMAGE,
        image_token="<|image_pad|>",
        image_inputs=qwen_image_inputs,
        token_types="mm_token_type_ids",
        config_tokens={
            "image_token_id": "<|image_pad|>",
            "video_token_id": "<|video_pad|>",
            "vision_start_token_id": "<|vision_start|>",
            "vision_end_token_id": "<|vision_end|>",
        },
        image_processor=qwen_image_processor,
        rope_index=qwen_rope_index,
        processor=qwen_processor,
        video=VideoSpec(
            placeholder=QWEN_VIDEO,
            video_token="<|video_pad|>",
            video_inputs=functools.partial(qwen_video_inputs, timing=timing),
            options=qwen_video_options(patch_size),
        ),
    )


_VL_TEXT = {key: value for key, value in TINY.items() if key != "tokenizer_vocab"}
#: images of 56x56 to 112x112 pixels: 4 to 16 image tokens each.
_VL_PIXELS = {"size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, "merge_size": 2, "temporal_patch_size": 2}
#: CLIP's normalisation, which Qwen-VL's processors use.
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _tiny_video(processor_type: str, patch_size: int) -> dict:
    """The tiny preset's video settings, as transformers' video processor reads them:
    2 frames a second, 2 to 8 of them, each 4 x 4 patches (4 tokens a time step)."""
    side = 4 * patch_size
    return {
        "video_processor_type": processor_type,
        "do_sample_frames": True,
        "fps": 2.0,
        "min_frames": 2,
        "max_frames": 8,
        "size": {"shortest_edge": side * side, "longest_edge": side * side},
        "patch_size": patch_size,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
    }


def vl_family(
    model_type: str,
    title: str,
    template: str,
    text: dict,
    vision: dict,
    patch_size: int,
    timing: str,
    video_processor: str,
    aliases: tuple[str, ...] = (),
) -> ModelFamily:
    """A Qwen vision-language family, named after its model type; ``text`` and ``vision``
    shape its tiny preset (over TINY's language model and a two-block ViT); ``timing`` is
    how its videos tell time (``qwen_video_inputs``), ``video_processor`` transformers'
    class for its video settings."""
    tiny = {
        "model_type": model_type,
        "text_config": {**_VL_TEXT, **text},
        "vision_config": {
            "depth": 2,
            "num_heads": 2,
            "patch_size": patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            **vision,
        },
        "tie_word_embeddings": True,
        "image_processor": {**_VL_PIXELS, "patch_size": patch_size},
        "video_processor": _tiny_video(video_processor, patch_size),
        "tokenizer_vocab": TINY["tokenizer_vocab"],
    }
    return ModelFamily(
        name=model_type,
        description=f"{title} (vision-language)",
        model_types=(model_type,),
        aliases=aliases,
        template=template,
        lora_targets=DENSE_TARGETS,
        module_groups=VL_GROUPS,
        vision=qwen_vision(timing, patch_size),
        presets={"tiny": tiny},
        tokenizer=QWEN_VL_TOKENIZER,
    )


#: What one clip is in Qwen2-Audio's chat text (its audio token repeated per feature).
QWEN_AUDIO = "<|audio_bos|><|AUDIO|><|audio_eos|>"

QWEN_AUDIO_TOKENIZER = TokenizerRecipe(
    split_regex=QWEN_SPLIT,
    nfc=True,
    special_tokens=("<|endoftext|>", "<|im_start|>", IM_END, "<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>"),
    eos_token=IM_END,
    pad_token="<|endoftext|>",
)

#: Qwen2-Audio's parts: the Whisper-style encoder, the projector into the language
#: model's width, and the language model.
AUDIO_GROUPS = {
    "audio": ("model.audio_tower",),
    "aligner": ("model.multi_modal_projector",),
    "llm": ("model.language_model", "lm_head"),
}


def whisper_feature_extractor(**options):
    """Qwen2-Audio's feature extractor: Whisper's log-mel frames, 10 ms apart, over a
    window of ``chunk_length`` seconds (30 in the released models)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(**options)


def qwen_audio_inputs(feature_extractor, clips, model_config):
    """Each clip's mel frames, padded to the encoder's window, and its frame mask; a clip
    takes one token per four frames (two stride-2 stages), as Qwen2AudioProcessor counts.
    A clip longer than the window would be cut silently, so it is refused."""
    window = feature_extractor.n_samples / feature_extractor.sampling_rate
    for clip in clips:
        if len(clip.samples) > feature_extractor.n_samples:
            raise ValueError(f"a clip of {clip.seconds:.1f} s is longer than the {window:g} s this model hears")
    inputs = feature_extractor(
        [clip.samples for clip in clips],
        sampling_rate=feature_extractor.sampling_rate,
        padding="max_length",
        return_attention_mask=True,
        return_tensors="pt",
    )
    frames = inputs["attention_mask"].sum(-1)
    counts = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    if (counts < 2).any():  # one token reads as the legacy unexpanded form to transformers
        raise ValueError(f"a clip of {clips[int(counts.argmin())].seconds:.2f} s is too short (at least 0.1 s)")
    return {
        "input_features": inputs["input_features"],
        "feature_attention_mask": inputs["attention_mask"],
    }, counts.tolist()


QWEN2_AUDIO = AudioSpec(
    placeholder=QWEN_AUDIO,
    audio_token="<|AUDIO|>",
    audio_inputs=qwen_audio_inputs,
    config_tokens={"audio_token_index": "<|AUDIO|>"},
    feature_extractor=whisper_feature_extractor,
)

#: What a picture and a video are in Qwen2.5-Omni's chat text (a clip is as in Qwen2-Audio's).
OMNI_IMAGE = "<|vision_bos|><|IMAGE|><|vision_eos|>"
OMNI_VIDEO = "<|vision_bos|><|VIDEO|><|vision_eos|>"
OMNI_SYSTEM = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech."
)

#: Qwen2-Audio's tokens and Qwen2.5-Omni's for pictures and videos.
OMNI_TOKENIZER = dataclasses.replace(
    QWEN_AUDIO_TOKENIZER,
    special_tokens=(*QWEN_AUDIO_TOKENIZER.special_tokens, "<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>"),
)

#: Qwen2.5-Omni thinker's parts: a Qwen2.5-VL ViT and a Whisper-style encoder, each with
#: the layer that maps it into the language model's width, and the language model.
OMNI_GROUPS = {
    "vision": ("model.visual",),
    "audio": ("model.audio_tower",),
    "aligner": ("model.visual.merger", "model.audio_tower.proj"),
    "llm": ("model.language_model", "lm_head"),
}


def omni_rope_index(model, input_ids, token_types, inputs):
    """Qwen2.5-Omni's time-aligned rotary positions of one example: pictures and videos
    placed by their grids (a video's time steps ``position_id_per_seconds`` apart per
    second), a clip's tokens one position each."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    frames = inputs.get("feature_attention_mask")
    positions, _ = base.model.get_rope_index(
        input_ids,
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=torch.ones_like(input_ids),
        audio_seqlens=None if frames is None else frames.sum(-1),
        second_per_grids=inputs.get("video_second_per_grid"),
    )
    return positions


OMNI_VISION = VisionSpec(
    placeholder=OMNI_IMAGE,
    image_token="<|IMAGE|>",
    image_inputs=qwen_image_inputs,
    config_tokens={
        "image_token_index": "<|IMAGE|>",
        "video_token_index": "<|VIDEO|>",
        "vision_start_token_id": "<|vision_bos|>",
        "vision_end_token_id": "<|vision_eos|>",
    },
    image_processor=qwen_image_processor,
    rope_index=omni_rope_index,
    video=VideoSpec(
        placeholder=OMNI_VIDEO,
        video_token="<|VIDEO|>",
        video_inputs=functools.partial(qwen_video_inputs, timing="grid_seconds", seconds_input="video_second_per_grid"),
        options=qwen_video_options(14),
    ),
)
OMNI_AUDIO = AudioSpec(
    placeholder=QWEN_AUDIO,
    audio_token="<|AUDIO|>",
    audio_inputs=qwen_audio_inputs,
    config_tokens={
        "audio_token_index": "<|AUDIO|>",
        "audio_start_token_id": "<|audio_bos|>",
        "audio_end_token_id": "<|audio_eos|>",
    },
    feature_extractor=whisper_feature_extractor,
)

_MROPE = {
    "rope_type": "default",
    "rope_theta": 10000.0,
    "mrope_section": [8, 12, 12],
}  # halves of head_dim 64, as 16/24/24 of 128

TINY_MOE = {**TINY, "num_hidden_layers": 2, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128}

QWEN2_TEMPLATE = ChatTemplate(
    name="qwen2",
    description="Qwen2/Qwen2.5 ChatML, default system prompt, tool calls",
    source=chatml_source(
        default_system="You are a helpful assistant.", image=QWEN_IMAGE, audio=QWEN_AUDIO, video=QWEN_VIDEO
    ),
    end_of_turn=(IM_END,),
    tool_calls=HERMES_TOOL_CALLS,
)
OMNI_TEMPLATE = ChatTemplate(
    name="qwen2_5_omni",
    description="Qwen2.5-Omni ChatML: its system prompt, pictures, videos and clips, tool calls",
    source=chatml_source(default_system=OMNI_SYSTEM, image=OMNI_IMAGE, audio=QWEN_AUDIO, video=OMNI_VIDEO),
    end_of_turn=(IM_END,),
    tool_calls=HERMES_TOOL_CALLS,
)
QWEN3_TEMPLATE = ChatTemplate(
    name="qwen3",
    description="Qwen3 ChatML; enable_thinking=false strips <think> blocks",
    source=chatml_source(thinking=True, image=QWEN_IMAGE, video=QWEN_VIDEO),
    end_of_turn=(IM_END,),
    options={"enable_thinking": True},
    tool_calls=HERMES_TOOL_CALLS,
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
            "qwen2.5-7b": {
                "model_type": "qwen2",
                "hidden_size": 3584,
                "intermediate_size": 18944,
                "num_hidden_layers": 28,
                "num_attention_heads": 28,
                "num_key_value_heads": 4,
                "max_position_embeddings": 32768,
                "rope_theta": 1000000.0,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False,
                "vocab_size": 152064,
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
        presets={"tiny": {"model_type": "qwen3_moe", **TINY_MOE, "head_dim": 64}},
        tokenizer=QWEN3_TOKENIZER,
    ),
    vl_family(
        "qwen2_vl",
        "Qwen2-VL",
        "qwen2",
        {"rope_parameters": _MROPE},
        {"embed_dim": 64, "hidden_size": 256, "mlp_ratio": 2},
        14,
        "none",
        "Qwen2VLVideoProcessor",
    ),
    vl_family(
        "qwen2_5_vl",
        "Qwen2.5-VL",
        "qwen2",
        {"rope_parameters": _MROPE},
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "out_hidden_size": 256,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        14,
        "grid_seconds",
        "Qwen2VLVideoProcessor",
        aliases=("qwen2.5-vl",),
    ),
    vl_family(
        "qwen3_vl",
        "Qwen3-VL (dense)",
        "qwen3",
        {
            "head_dim": 64,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [12, 10, 10],
                "mrope_interleaved": True,
            },
        },
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "out_hidden_size": 256,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        16,
        "timestamps",
        "Qwen3VLVideoProcessor",
    ),
)


FAMILIES += (
    ModelFamily(
        name="qwen2_audio",
        description="Qwen2-Audio (audio-language)",
        model_types=("qwen2_audio",),
        template="qwen2",
        lora_targets=DENSE_TARGETS,
        module_groups=AUDIO_GROUPS,
        audio=QWEN2_AUDIO,
        tokenizer=QWEN_AUDIO_TOKENIZER,
        presets={
            # a 2-second window (200 mel frames, 100 encoder positions): 50 tokens a clip at most
            "tiny": {
                "model_type": "qwen2_audio",
                "text_config": {"model_type": "qwen2", **_VL_TEXT},
                "audio_config": {
                    "num_mel_bins": 32,
                    "encoder_layers": 2,
                    "encoder_attention_heads": 2,
                    "encoder_ffn_dim": 128,
                    "d_model": 64,
                    "max_source_positions": 100,
                },
                "feature_extractor": {"feature_size": 32, "sampling_rate": 16000, "chunk_length": 2},
                "tokenizer_vocab": TINY["tokenizer_vocab"],
            },
            "qwen2-audio-7b": {
                "model_type": "qwen2_audio",
                "text_config": {
                    "model_type": "qwen2",
                    "hidden_size": 4096,
                    "intermediate_size": 11008,
                    "num_hidden_layers": 32,
                    "num_attention_heads": 32,
                    "num_key_value_heads": 32,
                    "max_position_embeddings": 8192,
                    "rms_norm_eps": 1e-5,
                    "vocab_size": 156032,
                },
                "audio_config": {
                    "num_mel_bins": 128,
                    "encoder_layers": 32,
                    "encoder_attention_heads": 20,
                    "encoder_ffn_dim": 5120,
                    "d_model": 1280,
                    "max_source_positions": 1500,
                },
                "feature_extractor": {"feature_size": 128, "sampling_rate": 16000, "chunk_length": 30},
                "tokenizer_vocab": 8000,
            },
        },
    ),
    ModelFamily(
        name="qwen2_5_omni_thinker",
        description="Qwen2.5-Omni's thinker (pictures, video and sound in, text out)",
        model_types=("qwen2_5_omni_thinker",),
        aliases=("qwen2.5-omni",),
        template="qwen2_5_omni",
        lora_targets=DENSE_TARGETS,
        module_groups=OMNI_GROUPS,
        vision=OMNI_VISION,
        audio=OMNI_AUDIO,
        tokenizer=OMNI_TOKENIZER,
        presets={
            # Qwen2.5-VL's tiny ViT and Qwen2-Audio's tiny 2-second encoder over TINY
            "tiny": {
                "model_type": "qwen2_5_omni_thinker",
                "text_config": {**_VL_TEXT, "rope_parameters": _MROPE},
                "vision_config": {
                    "depth": 2,
                    "num_heads": 2,
                    "hidden_size": 64,
                    "intermediate_size": 128,
                    "out_hidden_size": 256,
                    "patch_size": 14,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                    "window_size": 56,
                    "fullatt_block_indexes": [1],
                },
                "audio_config": {
                    "num_mel_bins": 32,
                    "encoder_layers": 2,
                    "encoder_attention_heads": 2,
                    "encoder_ffn_dim": 128,
                    "d_model": 64,
                    "max_source_positions": 100,
                    "n_window": 50,
                    "output_dim": 256,
                    # its fixed sinusoidal positions (rms 0.7) would swamp what convolutions drawn
                    # at std 0.02 make of a clip (rms 0.01), which a trained tower's do not
                    "initializer_range": 0.2,
                },
                "tie_word_embeddings": True,
                "image_processor": {**_VL_PIXELS, "patch_size": 14},
                "video_processor": _tiny_video("Qwen2VLVideoProcessor", 14),
                "feature_extractor": {"feature_size": 32, "sampling_rate": 16000, "chunk_length": 2},
                "tokenizer_vocab": TINY["tokenizer_vocab"],
            },
            "qwen2.5-omni-7b": {
                "model_type": "qwen2_5_omni_thinker",
                "text_config": {
                    "hidden_size": 3584,
                    "intermediate_size": 18944,
                    "num_hidden_layers": 28,
                    "num_attention_heads": 28,
                    "num_key_value_heads": 4,
                    "max_position_embeddings": 32768,
                    "rms_norm_eps": 1e-6,
                    "vocab_size": 152064,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                },
                "vision_config": {
                    "depth": 32,
                    "num_heads": 16,
                    "hidden_size": 1280,
                    "intermediate_size": 3420,
                    "out_hidden_size": 3584,
                    "patch_size": 14,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                    "window_size": 112,
                    "fullatt_block_indexes": [7, 15, 23, 31],
                },
                "audio_config": {
                    "num_mel_bins": 128,
                    "encoder_layers": 32,
                    "encoder_attention_heads": 20,
                    "encoder_ffn_dim": 5120,
                    "d_model": 1280,
                    "max_source_positions": 1500,
                    "n_window": 100,
                    "output_dim": 3584,
                },
                "tie_word_embeddings": False,
                "feature_extractor": {"feature_size": 128, "sampling_rate": 16000, "chunk_length": 30},
                "tokenizer_vocab": 8000,
            },
        },
    ),
)


@hookimpl
def register_templates(register):
    register(QWEN2_TEMPLATE)
    register(QWEN3_TEMPLATE)
    register(OMNI_TEMPLATE)


@hookimpl
def register_models(register):
    for family in FAMILIES:
        register(family)
