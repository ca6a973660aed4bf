"""megatron-core's ``GPTModel`` for a transformers checkpoint: its ``TransformerConfig``,
its layer spec, and one pipeline stage built and loaded with this rank's shard.

The layer spec is Transformer Engine's when it is installed (fused kernels; context
parallelism needs it) and megatron-core's own modules otherwise. The two name the
pre-attention and pre-MLP norms differently (TE fuses each into the linear layer after
it); ``to_spec_names``/``from_spec_names`` translate.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelloop_megatron_checkpoint import Layout, Shard, hf_to_megatron, shard_state_dict


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def rope_theta(config: Any) -> float:
    """The rotary base; megatron-core's ``GPTModel`` applies plain RoPE only."""
    parameters = getattr(config, "rope_parameters", None) or {}
    kind = parameters.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"megatron-core here applies plain RoPE; this model uses {kind!r} rope scaling")
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def transformer_config(
    config: Any,
    *,
    mesh: Mapping[str, int],
    sequence_parallel: bool,
    dtype: Any,
    recompute: bool,
    moe_dispatcher: str = "alltoall",
) -> Any:
    """megatron-core's ``TransformerConfig`` for a transformers config and this mesh;
    ``moe_dispatcher`` is how tokens reach their experts (``alltoall`` or ``allgather``)."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    layout = Layout.from_hf(config)
    if config.hidden_act != "silu":
        raise ValueError(f"megatron-core conversion expects SwiGLU (silu); this model uses {config.hidden_act!r}")
    moe: dict[str, Any] = {}
    if layout.num_experts:
        moe = {
            "num_moe_experts": layout.num_experts,
            "moe_ffn_hidden_size": config.moe_intermediate_size,
            "moe_router_topk": config.num_experts_per_tok,
            # softmax over all experts then top-k (transformers) equals top-k then softmax
            # over the chosen (megatron's default) exactly when the top-k are renormalised
            "moe_router_pre_softmax": not config.norm_topk_prob,
            "moe_router_load_balancing_type": "aux_loss",
            "moe_aux_loss_coeff": float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0),
            "moe_token_dispatcher_type": moe_dispatcher,
        }
    return TransformerConfig(
        num_layers=layout.num_layers,
        hidden_size=layout.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=layout.num_heads,
        num_query_groups=layout.num_query_groups,
        kv_channels=layout.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=layout.qkv_bias,
        qk_layernorm=layout.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        tensor_model_parallel_size=mesh.get("tp", 1),
        pipeline_model_parallel_size=mesh.get("pp", 1),
        expert_model_parallel_size=mesh.get("ep", 1),
        expert_tensor_parallel_size=1,  # experts whole on each rank (what the checkpoint shards assume)
        context_parallel_size=mesh.get("cp", 1),
        sequence_parallel=sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        use_cpu_initialization=True,  # built on the host, moved once
        perform_initialization=False,  # the checkpoint's weights replace any random ones
        **moe,
    )


def layer_spec(layout: Layout, *, transformer_engine: bool) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    experts = layout.num_experts or None
    if transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec(num_experts=experts, qk_layernorm=layout.qk_norm)
    return get_gpt_layer_local_spec(num_experts=experts, qk_layernorm=layout.qk_norm, normalization="RMSNorm")


def build_stage(config: Any, transformer: Any, shard: Shard, *, transformer_engine: bool) -> Any:
    """This pipeline stage of the model, randomly initialised (``load_stage`` fills it)."""
    from megatron.core.models.gpt import GPTModel

    layout = Layout.from_hf(config)
    if layout.num_experts:
        define_missing_te_gemm()
    return GPTModel(
        config=transformer,
        transformer_layer_spec=layer_spec(layout, transformer_engine=transformer_engine),
        vocab_size=layout.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=shard.first_stage,
        post_process=shard.last_stage,
        share_embeddings_and_output_weights=layout.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=int(rope_theta(config)),
    )


def define_missing_te_gemm() -> None:
    """megatron-core 0.16.1's MoE router asks ``te_general_gemm is not None`` but defines
    the name only when Transformer Engine imports, so without TE every MoE forward stops
    with a NameError. None is what its check expects when TE is absent."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def load_stage(model: Any, hf: Mapping[str, Any], layout: Layout, shard: Shard, *, transformer_engine: bool) -> None:
    """Copy this rank's shard of the transformers weights ``hf`` into ``model``.

    ``hf`` may be lazy (``read_safetensors``): only the tensors of this stage's layers
    are read.
    """
    megatron = hf_to_megatron(hf, layout, layers=shard.layers(layout), first=shard.first_stage, last=shard.last_stage)
    state = to_spec_names(shard_state_dict(megatron, layout, shard), layout, transformer_engine=transformer_engine)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("_extra_state")]  # TE's fp8 metadata, not weights
    if missing or unexpected:
        raise ValueError(f"checkpoint and megatron model disagree: missing {missing[:3]}, unexpected {unexpected[:3]}")


def stage_state_dict(model: Any, layout: Layout, *, transformer_engine: bool) -> dict[str, Any]:
    """This rank's weights in the names ``join_shards`` takes (without TE's extra state)."""
    state = {key: value for key, value in model.state_dict().items() if not key.endswith("_extra_state")}
    return from_spec_names(state, layout, transformer_engine=transformer_engine)


#: the norms Transformer Engine fuses into the linear layer that follows them.
_FUSED_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def to_spec_names(state: Mapping[str, Any], layout: Layout, *, transformer_engine: bool) -> dict[str, Any]:
    return _rename(state, _fused(layout) if transformer_engine else {})


def from_spec_names(state: Mapping[str, Any], layout: Layout, *, transformer_engine: bool) -> dict[str, Any]:
    return _rename(state, {fused: plain for plain, fused in _fused(layout).items()} if transformer_engine else {})


def _fused(layout: Layout) -> dict[str, str]:
    # an MoE layer's router and experts come after a norm of their own
    return {
        plain: fused
        for plain, fused in _FUSED_NORMS.items()
        if not (layout.num_experts and plain.startswith("pre_mlp"))
    }


def _rename(state: Mapping[str, Any], suffixes: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        for old, new in suffixes.items():
            if key.endswith("." + old):
                key = key[: -len(old)] + new
                break
        out[key] = value
    return out


def write_hf_folder(state: Mapping[str, Any], config: Any, folder: Path) -> None:
    """Weights (checkpoint names) and config as a transformers folder: sharded safetensors
    with an index when large. Each tensor is copied out of the views the conversion made,
    so no two saved tensors share memory."""
    from huggingface_hub import save_torch_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict({name: tensor.contiguous().clone() for name, tensor in state.items()}, folder)
    config.save_pretrained(folder)


class SafetensorsFolder(Mapping):
    """A transformers checkpoint folder's tensors, read one at a time when asked for, so
    a pipeline stage reads only its own layers."""

    def __init__(self, folder: Path) -> None:
        import json

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(folder / "model.safetensors", "pt") as handle:
                self.files = {name: folder / "model.safetensors" for name in handle.keys()}
        else:
            raise FileNotFoundError(f"{folder}: no model.safetensors (megatron starts from safetensors weights)")

    def __getitem__(self, name: str) -> Any:
        from safetensors import safe_open

        if name not in self.files:
            raise KeyError(name)
        with safe_open(self.files[name], "pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)
