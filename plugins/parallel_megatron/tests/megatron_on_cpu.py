"""Run under torchrun: convert a random transformers model to megatron-core, load this
rank's tensor-parallel shard into a real ``GPTModel``, compare its logits with
transformers', then gather every rank's weights, convert them back, write them as a
transformers folder and load that.

``python -m torch.distributed.run --nproc-per-node TP megatron_on_cpu.py FOLDER MODEL_TYPE...``
prints one JSON line per model type on rank 0.

megatron-core runs its forward on CUDA only; three shims, for this check alone, let it
run on a CPU with gloo: the rotary table and router weights move to "the current CUDA
device" (here the CPU), the causal mask is passed instead of built on CUDA, and dropout's
CUDA RNG tracker is replaced by the no-op one megatron uses for inference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

torch.cuda.current_device = lambda: "cpu"  # noqa: E731 — shim 1: "move to the GPU" means stay

from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel.random import initialize_rng_tracker  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from modelloop_megatron_checkpoint import Layout, Shard, join_shards, megatron_to_hf  # noqa: E402
from modelloop_megatron_model import (  # noqa: E402
    SafetensorsFolder,
    build_stage,
    load_stage,
    stage_state_dict,
    transformer_config,
    write_hf_folder,
)  # noqa: E402

SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}
EXTRA = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"tie_word_embeddings": True, "head_dim": 32},
    "qwen3_moe": {
        "tie_word_embeddings": True,
        "head_dim": 32,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
    },
}


def random_model(model_type: str, folder: Path) -> tuple[AutoModelForCausalLM, Path]:
    config = AutoConfig.for_model(model_type, **SIZES, **EXTRA[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases away from their initial 1 and 0, so that a swap would show
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    path = folder / model_type
    if dist.get_rank() == 0:
        model.save_pretrained(path)
    dist.barrier()
    return model, path


def check(model_type: str, folder: Path) -> dict:
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    hf, path = random_model(model_type, folder)
    layout = Layout.from_hf(hf.config)
    shard = Shard(tp=tp, tp_rank=rank)
    config = transformer_config(
        hf.config,
        mesh={"tp": tp},
        sequence_parallel=False,
        dtype=torch.float32,
        recompute=False,
        moe_dispatcher="allgather",
    )
    stage = build_stage(hf.config, config, shard, transformer_engine=False).eval()
    load_stage(stage, SafetensorsFolder(path), layout, shard, transformer_engine=False)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    causal = torch.triu(torch.ones(12, 12, dtype=torch.bool), 1)[None, None]  # shim 2
    with torch.no_grad():
        expected = hf(ids).logits.chunk(tp, dim=-1)[rank]  # each rank holds its slice of the vocabulary
        logits = stage(ids, torch.arange(12).expand(2, -1), attention_mask=causal)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (shard, stage_state_dict(stage, layout, transformer_engine=False)))
    back = megatron_to_hf(join_shards(dict(parts), layout), layout)
    original = dict(SafetensorsFolder(path))  # the checkpoint's format (transformers 5 fuses experts only in memory)
    differ = sorted(set(original) ^ set(back)) + [
        key for key in original if key in back and not torch.equal(original[key], back[key])
    ]
    saved = folder / f"{model_type}-back"
    if dist.get_rank() == 0:
        write_hf_folder(back, hf.config, saved)
        with torch.no_grad():
            reloaded = (AutoModelForCausalLM.from_pretrained(saved)(ids).logits - hf(ids).logits).abs().max().item()
    dist.barrier()
    return {
        "model_type": model_type,
        "tp": tp,
        "max_logit_difference": (logits - expected).abs().max().item(),
        "round_trip_differs": differ,
        "saved_logit_difference": reloaded if dist.get_rank() == 0 else None,
    }


def main() -> None:
    folder, model_types = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dist.get_world_size(), expert_tensor_parallel_size=1
    )
    initialize_rng_tracker(inference_rng_tracker=True)  # shim 3
    for model_type in model_types:
        result = check(model_type, folder)
        if dist.get_rank() == 0:
            print(json.dumps(result), flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
