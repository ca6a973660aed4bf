"""Precision: what each dtype means on each device, and mixed precision that loses no update."""

from __future__ import annotations

import json

import pytest
import torch

import modelloop
from modelloop.config import ConfigError
from modelloop.models.precision import Precision, PrecisionError


@pytest.mark.parametrize(
    ("dtype", "cuda", "bf16", "expected"),
    [
        ("auto", True, True, ("bf16", True)),
        ("auto", True, False, ("fp16", True)),
        ("auto", False, False, ("auto", False)),  # a CPU keeps the weights as saved
        ("bf16", False, False, ("bf16", True)),
        ("fp16", True, True, ("fp16", True)),
        ("fp32", True, True, ("fp32", False)),
    ],
)
def test_each_dtype_means_one_precision_per_device(dtype, cuda, bf16, expected):
    precision = Precision.resolve(dtype, cuda=cuda, bf16_supported=bf16)
    assert (precision.compute, precision.mixed) == expected


def test_precisions_a_device_cannot_train_in_are_refused():
    with pytest.raises(PrecisionError, match="fp16 trains with loss scaling, which needs a CUDA GPU"):
        Precision.resolve("fp16", cuda=False)
    with pytest.raises(PrecisionError, match="this GPU has no bf16"):
        Precision.resolve("bf16", cuda=True, bf16_supported=False)


def test_mixed_precision_loads_master_weights_for_full_tuning_and_16_bits_under_adapters():
    mixed = Precision.resolve("auto", cuda=True)
    assert mixed.load_dtype(trains_base_weights=True) == "fp32"
    assert mixed.load_dtype(trains_base_weights=False) == "bf16"
    assert mixed.trainer_arguments == {"bf16": True, "fp16": False}
    assert Precision.resolve("auto", cuda=False).trainer_arguments == {"bf16": False, "fp16": False}


@pytest.mark.parametrize("method", ["dpo", "kto", "orpo", "grpo"])
def test_an_rlhf_run_not_in_mixed_precision_is_not_turned_to_bf16_by_trl(method, tmp_path):
    """TRL's configs turn bf16 on unless told otherwise: an fp32 run, and every rlhf run on
    a CPU, multiplied in bf16 under autocast (several times slower there), while its
    manifest said fp32 or as saved."""
    from modelloop.config import RLHFConfig, build_config
    from modelloop.stages.rlhf import trl_arguments

    grpo = {"rewards": ["accuracy"], "batch_size": 8} if method == "grpo" else {}
    config = build_config(RLHFConfig, {"model": "m", "data": ["d.jsonl"], "method": method, "dtype": "fp32", **grpo})
    arguments = trl_arguments(config, tmp_path, evaluating=False)
    assert (arguments.bf16, arguments.fp16) == (False, False)


def chats(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
        for i in range(16)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_lora_adapters_train_in_fp32_over_a_bf16_base(tiny_models, tmp_path, monkeypatch):
    from modelloop.stages import train as stage

    seen = {}
    prepare = stage.load_trainable

    def spy(*args, **kwargs):
        model = prepare(*args, **kwargs)
        seen.update({name: p.dtype for name, p in model.named_parameters()})
        seen["trainable"] = {name for name, p in model.named_parameters() if p.requires_grad}
        seen["casting"] = {
            module.cast_input_dtype_enabled for module in model.modules() if hasattr(module, "_cast_input_dtype")
        }
        return model

    monkeypatch.setattr(stage, "load_trainable", spy)
    modelloop.sft(
        {
            "model": str(tiny_models("qwen2")),
            "data": [str(chats(tmp_path))],
            "dtype": "bf16",
            "max_steps": 2,
            "batch_size": 4,
            "max_length": 64,
            "output_dir": str(tmp_path / "run"),
        }
    )
    trainable = seen.pop("trainable")
    assert seen.pop("casting") == {False}  # autocast picks the product's type: no fp32 copy of each input
    assert trainable and all(seen[name] == torch.float32 for name in trainable)
    assert {dtype for name, dtype in seen.items() if name not in trainable} == {torch.bfloat16}
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["compute"]["precision"] == {"compute": "bf16", "mixed": True, "trainable": "fp32"}
    assert manifest["status"] == "completed" and manifest["metrics"]["train_loss"] > 0


def test_full_tuning_in_bf16_keeps_updates_a_bf16_weight_would_round_away(tiny_models, tmp_path):
    """At lr 1e-6 every Adam update is far below a bf16 weight's spacing (2^-8 of it):
    pure bf16 weights would not move at all; fp32 master weights do."""
    from safetensors.torch import load_file

    settings = {
        "model": str(tiny_models("qwen2")),
        "data": [str(chats(tmp_path))],
        "tuner": "full",
        "dtype": "bf16",
        "lr": 1e-6,
        "max_steps": 2,
        "batch_size": 4,
        "max_length": 64,
    }
    modelloop.sft({**settings, "output_dir": str(tmp_path / "run")})
    start = load_file(next(tiny_models("qwen2").glob("*.safetensors")))
    trained = load_file(next((tmp_path / "run" / "model").glob("*.safetensors")))
    name = "model.layers.0.mlp.down_proj.weight"
    assert trained[name].dtype == torch.float32
    moved = (trained[name] - start[name]).abs()
    spacing = start[name].abs() * 2**-8
    assert (moved > 0).float().mean() > 0.5  # most weights moved
    assert (moved[moved > 0] < spacing[moved > 0]).float().mean() > 0.5  # by less than bf16 can tell apart


def test_fp16_on_a_cpu_is_refused_before_loading(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="fp16 trains with loss scaling"):
        modelloop.sft(
            {
                "model": str(tiny_models("qwen2")),
                "data": [str(chats(tmp_path))],
                "dtype": "fp16",
                "output_dir": str(tmp_path / "run"),
            }
        )
    assert not (tmp_path / "run").exists()
