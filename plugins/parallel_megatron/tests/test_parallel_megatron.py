"""The megatron strategy: its plans, the HF <-> megatron-core conversion (checked against
real megatron-core models on this CPU), and training (GPU-marked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modelloop.parallel.plan import PlanError, PlanRequest, make_plan
from modelloop.parallel.world import World, free_port
from modelloop.registry import TUNERS, get_registry
from modelloop_megatron_checkpoint import Layout, Shard, hf_to_megatron, join_shards, megatron_to_hf, shard_state_dict
from modelloop_megatron_model import from_spec_names, to_spec_names
from modelloop_parallel_megatron import refuse_unsupported

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent
QWEN_7B = {
    "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768, "torch_dtype": "bfloat16",
}  # fmt: skip


def config(model_type: str = "qwen2", **fields):
    from transformers import AutoConfig

    sizes = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
    }
    if model_type == "qwen3_moe":
        sizes.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)
    return AutoConfig.for_model(model_type, **{**sizes, **fields})


def request(model_config, nproc: int = 8, tuner: str = "full", cp: int = 1, **options) -> PlanRequest:
    """A plan request on GPUs; ``cp`` is ``--sequence-parallel``, ``options`` the strategy's."""
    return PlanRequest(
        World(nproc=nproc),
        model_config,
        None,
        get_registry(TUNERS).get(tuner),
        options,
        batch_size=2,
        max_length=64,
        gradient_checkpointing=False,
        cuda=True,
        sequence_parallel=cp,
    )


# --------------------------------------------------------------------------- plans


def test_the_mesh_splits_the_world_into_tensor_pipeline_and_data_parallel_ranks():
    _, plan = make_plan("megatron", request(config(), tp=2, pp=2))
    assert plan.mesh == {"dp": 2, "tp": 2, "pp": 2}
    assert plan.shard == 1 and plan.master_weights  # the distributed optimizer's fp32 copies, spread over dp
    # megatron's own norms refuse it; it needs TE
    assert plan.trainer_arguments["megatron"]["sequence_parallel"] is False
    assert any("2 layers per pipeline stage" in note for note in plan.notes)
    _, moe = make_plan("megatron", request(config("qwen3_moe"), ep=4))
    assert moe.mesh == {"dp": 2, "ep": 4}
    assert any(
        "experts spread over ep=4 ranks; other weights replicated over dp x ep = 8 ranks" in note for note in moe.notes
    )


@pytest.mark.parametrize(
    ("model_config", "options", "message"),
    [
        (config(), {"tuner": "lora"}, "tuner 'lora' trains only some weights: use fsdp or deepspeed"),
        (config(), {"tuner": "galore"}, "tuner 'galore' brings its own optimizer"),
        (config("gemma"), {}, "no megatron-core conversion"),
        (config(), {"tp": 3, "nproc": 3}, "tp=3 does not divide the model's 2 key/value heads"),
        (config(vocab_size=129), {"tp": 2}, "tp=2 does not divide the model's 129 vocabulary entries"),
        (config(), {"pp": 3, "nproc": 6}, "pp=3 does not divide the model's 4 layers"),
        (config(), {"ep": 2}, "ep=2: the model has no experts"),
        (config(), {"tp": 2, "nproc": 6, "pp": 2}, "does not divide the 6 processes"),
        (config(), {"cp": 2}, "context parallelism .* needs Transformer Engine"),
        (config("mistral", sliding_window=32), {}, "sliding window of 32 tokens"),
        (config(), {"tp": 0}, "tp must be a whole number"),
        (config(), {"tp": 2, "sequence_parallel": True}, "sequence_parallel needs Transformer Engine"),
        (config(), {"sequence_parallel": True}, "sequence_parallel .* needs tp > 1"),
    ],
    ids=[
        "adapter",
        "own-optimizer",
        "model-type",
        "heads",
        "vocabulary",
        "layers",
        "dense-ep",
        "world",
        "cp-without-te",
        "sliding-window",
        "zero",
        "sp-without-te",
        "sp-without-tp",
    ],
)
def test_plans_that_cannot_work_are_refused_before_anything_starts(model_config, options, message):
    with pytest.raises(PlanError, match=f"the megatron strategy: .*{message}"):
        make_plan("megatron", request(model_config, **options))


def test_it_runs_on_gpus_only():
    with pytest.raises(PlanError, match="runs on CUDA GPUs only"):
        make_plan(
            "megatron",
            PlanRequest(
                World(nproc=1),
                config(),
                None,
                get_registry(TUNERS).get("full"),
                {},
                batch_size=2,
                max_length=64,
                gradient_checkpointing=False,
                cuda=False,
            ),
        )


def test_what_the_loop_does_not_do_is_refused_by_name():
    from modelloop.config import TrainConfig, build_config

    with pytest.raises(ValueError, match="does not support packing: .*--no-packing"):
        refuse_unsupported(build_config(TrainConfig, {"model": "m", "data": ["d"]}))
    refuse_unsupported(build_config(TrainConfig, {"model": "m", "data": ["d"], "packing": False}))


def test_modelloop_plan_prints_the_megatron_mesh_and_splits_the_estimate(tmp_path):
    from click.testing import CliRunner

    from modelloop.cli import build_cli

    (tmp_path / "config.json").write_text(json.dumps(QWEN_7B))
    plan = [
        "plan",
        "--model",
        str(tmp_path),
        "--tuner",
        "full",
        "--max-length",
        "4096",
        "--batch-size",
        "1",
        "--nproc",
        "8",
        "--gpu-memory",
        "80GiB",
    ]
    result = CliRunner().invoke(
        build_cli(),
        [*plan, "--strategy", "megatron", "--set", "strategy_options.tp=4", "--set", "strategy_options.pp=2"],
    )
    assert result.exit_code == 0, result.output
    assert "dp=1 x tp=4 x pp=2" in result.output and "14 layers per pipeline stage" in result.output
    assert "weights          1,815.7 MiB" in result.output  # 7.6 B bf16 weights over tp x pp = 8 GPUs


# --------------------------------------------------------------------------- conversion


def random_state(model_config) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        names = AutoModelForCausalLM.from_config(model_config).state_dict()
    return {name: torch.randn(tensor.shape) for name, tensor in names.items()}


def checkpoint_format(model_config) -> dict:
    """A random model's weights as its safetensors files name them (experts one by one)."""
    import torch

    state = random_state(model_config)
    for name in [name for name in state if name.endswith("mlp.experts.gate_up_proj")]:
        prefix, fused, down = (
            name[: -len("gate_up_proj")],
            state.pop(name),
            state.pop(name.replace("gate_up_proj", "down_proj")),
        )
        for expert in range(fused.shape[0]):
            gate, up = fused[expert].chunk(2)
            state.update(
                {
                    f"{prefix}{expert}.gate_proj.weight": gate,
                    f"{prefix}{expert}.up_proj.weight": up,
                    f"{prefix}{expert}.down_proj.weight": down[expert],
                }
            )
    if model_config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return {name: tensor.to(torch.float32) for name, tensor in state.items()}


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_shards_over_tp_pp_and_ep_join_back_to_the_same_checkpoint(model_type):
    import torch

    model_config = config(model_type, tie_word_embeddings=model_type != "llama")
    layout = Layout.from_hf(model_config)
    hf = checkpoint_format(model_config)
    full = hf_to_megatron(hf, layout)
    ep = 2 if layout.num_experts else 1
    shards = {
        Shard(tp=2, pp=2, ep=ep, tp_rank=t, pp_rank=p, ep_rank=e): None
        for t in range(2)
        for p in range(2)
        for e in range(ep)
    }
    shards = {shard: shard_state_dict(full, layout, shard) for shard in shards}
    last = shards[Shard(tp=2, pp=2, ep=ep, tp_rank=1, pp_rank=1, ep_rank=ep - 1)]
    # numbered from 0 per stage
    assert "decoder.layers.1.input_layernorm.weight" in last and "decoder.layers.2.input_layernorm.weight" not in last
    # half the vocabulary; tied models keep a copy on the last stage
    assert last["output_layer.weight"].shape == (
        64,
        64,
    )
    if layout.num_experts:
        assert {key.split(".")[6] for key in last if "local_experts" in key} == {
            "0",
            "1",
        }  # two of four experts, numbered locally
    back = megatron_to_hf(join_shards(shards, layout), layout)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[name], hf[name]) for name in hf)
    if (
        layout.num_experts
    ):  # what save_model gathers with tp=2, ep=2: megatron's expert mesh pairs tp rank t with ep rank t
        paired = {shard: state for shard, state in shards.items() if shard.tp_rank == shard.ep_rank}
        assert megatron_to_hf(join_shards(paired, layout), layout).keys() == hf.keys()


def test_transformer_engines_fused_norm_names_translate_both_ways():
    import torch

    layout = Layout.from_hf(config())
    state = {
        "decoder.layers.0.input_layernorm.weight": torch.ones(2),
        "decoder.layers.0.pre_mlp_layernorm.weight": torch.zeros(2),
    }
    fused = to_spec_names(state, layout, transformer_engine=True)
    assert set(fused) == {
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
    }
    assert from_spec_names(fused, layout, transformer_engine=True).keys() == state.keys()
    moe = Layout.from_hf(config("qwen3_moe"))
    # before the router, not fused
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in to_spec_names(state, moe, transformer_engine=True)


def run_on_cpu(tmp_path: Path, nproc: int, *model_types: str) -> list[dict]:
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        str(HERE / "megatron_on_cpu.py"),
        str(tmp_path),
        *model_types,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_a_converted_model_gives_transformers_logits_in_megatron_core(tmp_path):
    results = run_on_cpu(tmp_path, 1, "llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
    assert [result["model_type"] for result in results] == ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe"]
    for result in results:
        assert result["max_logit_difference"] < 1e-5, result
        assert result["round_trip_differs"] == [], result
        assert result["saved_logit_difference"] == 0.0, result  # the written folder is the same model


def test_tensor_parallel_shards_give_the_same_logits_and_join_back(tmp_path):
    results = run_on_cpu(tmp_path, 2, "qwen2", "qwen3_moe")
    assert len(results) == 2
    for result in results:
        assert result["tp"] == 2 and result["max_logit_difference"] < 1e-5, result
        assert result["round_trip_differs"] == [], result


# --------------------------------------------------------------------------- training (GPUs)


def gpus() -> int:
    import torch

    return torch.cuda.device_count()


def megatron_sft(model: Path, out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    argv = [
        sys.executable,
        "-m",
        "modelloop",
        "sft",
        "--model",
        str(model),
        "--data",
        str(REPO / "examples" / "data" / "sums.jsonl"),
        "--no-packing",
    ]
    argv += [
        "--max-length",
        "64",
        "--max-steps",
        "8",
        "--lr",
        "1e-3",
        "--logging-steps",
        "1",
        "--batch-size",
        "2",
        "--nproc",
        str(nproc),
        "--strategy",
        "megatron",
    ]
    return subprocess.run([*argv, "--output-dir", str(out), *extra], capture_output=True, text=True, timeout=900)


@pytest.mark.gpu
@pytest.mark.skipif(gpus() < 1, reason="megatron-core trains on CUDA GPUs")
def test_megatron_trains_and_saves_an_ordinary_transformers_folder(tiny_models, subprocess_env, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    done = megatron_sft(tiny_models("qwen2"), out, 1)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["parallel"]["wrapped_as"] == "megatron"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0]
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"))
    assert not trained.model.layers[0].self_attn.q_proj.weight.equal(base.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.gpu
@pytest.mark.skipif(gpus() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("split", ["tp", "pp"])
def test_two_gpus_split_the_model_and_still_save_one_folder(tiny_models, subprocess_env, tmp_path, split):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    done = megatron_sft(tiny_models("qwen2"), out, 2, "--set", f"strategy_options.{split}=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["parallel"]["mesh"][split] == 2
    AutoModelForCausalLM.from_pretrained(out / "model")
