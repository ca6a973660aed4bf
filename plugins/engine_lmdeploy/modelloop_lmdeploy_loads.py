"""Whether LMDeploy can load an export, asked before ``export --for lmdeploy`` writes it
(``Engine.check_export``: the kernel hands over the config.json as it will be written).

LMDeploy picks a back end by the architecture in config.json: TurboMind where it has one,
else its PyTorch engine; each loads its own quantisation formats, and a tokenizer without
a chat template makes it fall back to its plain ``base`` template, which is not the one
the model was trained with. The tables are LMDeploy 0.16's (``lmdeploy/turbomind/
supported_models.py``, ``lmdeploy/pytorch/models/module_map.py`` less its draft and reward
heads, and the quantisation checks of ``lmdeploy/turbomind/converter.py`` and
``lmdeploy/pytorch/config.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TURBOMIND = frozenset(
    {
        "GptOssForCausalLM",
        "Glm4MoeLiteForCausalLM",
        "InternLM2ForCausalLM",
        "InternLM3ForCausalLM",
        "InternS1ForConditionalGeneration",
        "InternS2MobiusForConditionalGeneration",
        "InternS2PreviewForConditionalGeneration",
        "InternVLChatModel",
        "InternVLForConditionalGeneration",
        "LlamaForCausalLM",
        "MixtralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "Qwen3_5ForConditionalGeneration",
        "Qwen3_5MoeForConditionalGeneration",
    }
)
PYTORCH = frozenset(
    {
        "ChatGLMForConditionalGeneration",
        "CogVLMForCausalLM",
        "DeepseekForCausalLM",
        "DeepseekV2ForCausalLM",
        "DeepseekV32ForCausalLM",
        "DeepseekV3ForCausalLM",
        "DeepseekV4ForCausalLM",
        "DeepseekVLV2ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Gemma3ForConditionalGeneration",
        "GemmaForCausalLM",
        "Glm4ForCausalLM",
        "Glm4MoeForCausalLM",
        "Glm4MoeLiteForCausalLM",
        "Glm4vForConditionalGeneration",
        "GlmMoeDsaForCausalLM",
        "GptOssForCausalLM",
        "HYV3ForCausalLM",
        "InternLM2ForCausalLM",
        "InternLM3ForCausalLM",
        "InternS1ForConditionalGeneration",
        "InternS1ProForConditionalGeneration",
        "InternS1_1_ForConditionalGeneration",
        "InternS2MobiusForCausalLM",
        "InternS2MobiusForConditionalGeneration",
        "InternS2PreviewForCausalLM",
        "InternS2PreviewForConditionalGeneration",
        "InternVLChatModel",
        "InternVLForConditionalGeneration",
        "Llama4ForConditionalGeneration",
        "LlamaForCausalLM",
        "LlavaForConditionalGeneration",
        "LlavaNextForConditionalGeneration",
        "MetaMoeForConditionalGeneration",
        "MiniCPM3ForCausalLM",
        "MiniCPMV",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "Phi3ForCausalLM",
        "Phi3VForCausalLM",
        "PhiMoEForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "Qwen3NextForCausalLM",
        "Qwen3OmniMoeForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLMoeForConditionalGeneration",
        "Qwen3_5ForConditionalGeneration",
        "Qwen3_5MoeForConditionalGeneration",
        "SDARForCausalLM",
        "SDARMoeForCausalLM",
    }
)


def back_ends(quantization: Mapping[str, Any] | None) -> tuple[set[str], str]:
    """The LMDeploy back ends that load weights quantised so, and what the others lack."""
    if not quantization:
        return {"turbomind", "pytorch"}, ""
    method = quantization.get("quant_method")
    group = int(quantization.get("group_size") or 128)
    if method == "awq":
        if quantization.get("version", "gemm") == "gemm" and group == 128:
            return {"turbomind", "pytorch"}, ""
        return {"pytorch"}, "TurboMind takes AWQ only as version gemm in groups of 128"
    if method == "gptq":
        if quantization.get("desc_act") or not quantization.get("sym", True) or group != 128:
            return set(), "LMDeploy loads GPTQ only symmetric, without act-order (desc_act), in groups of 128"
        return {"turbomind"}, "only TurboMind loads GPTQ"
    if method == "compressed-tensors":
        group_0 = quantization.get("config_groups", {}).get("group_0", {})
        weights = group_0.get("weights", {})
        shape = (group_0.get("format"), weights.get("num_bits"), weights.get("type"))
        if shape != ("pack-quantized", 4, "int") or weights.get("group_size") not in (32, 128):
            return set(), (
                "LMDeploy loads compressed-tensors only as pack-quantized 4-bit int weights in groups of 32 or 128, "
                f"not {shape[0]} {shape[1]}-bit {shape[2]} (its FP8 is the blocked quant_method fp8)"
            )
        return {"turbomind"}, "only TurboMind loads compressed-tensors"
    if method == "fp8":
        return {"turbomind", "pytorch"}, ""
    return set(), f"LMDeploy does not load {method} weights (it loads awq, gptq, int4 compressed-tensors and fp8)"


def check_export(config: Mapping[str, Any], exporter: str, chat_template: bool) -> str | None:
    """Why LMDeploy cannot serve an export with this config.json (its ``quantization_config``
    as the exporter writes it) and tokenizer, or None (``Engine.check_export``)."""
    architecture = (config.get("architectures") or [None])[0]
    can_run = {name for name, table in (("turbomind", TURBOMIND), ("pytorch", PYTORCH)) if architecture in table}
    if not can_run:
        return f"LMDeploy has no {architecture} (model_type {config.get('model_type')!r}) in TurboMind or PyTorch"
    loads, lacking = back_ends(config.get("quantization_config"))
    if not loads:
        return lacking
    if not can_run & loads:
        return f"{architecture} runs on LMDeploy's {' and '.join(sorted(can_run))} back end only; {lacking}"
    if not chat_template:
        return "the tokenizer has no chat template, and LMDeploy would chat with its plain 'base' one instead"
    return None
