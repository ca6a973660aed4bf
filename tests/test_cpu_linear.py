"""Linear layers multiplied by oneDNN: torch's results and gradients, within fp32 rounding."""

from __future__ import annotations

import pytest
import torch

from modelloop.models.cpu_linear import OneDNNLinear, multiply_with_onednn, onednn_available

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("trained", [True, False])
def test_products_and_gradients_match_torch(bias, trained):
    torch.manual_seed(0)
    reference = torch.nn.Linear(48, 40, bias=bias)
    reference.weight.requires_grad_(trained)
    layer = torch.nn.Linear(48, 40, bias=bias)
    layer.load_state_dict(reference.state_dict())
    layer.weight.requires_grad_(trained)
    multiply_with_onednn(torch.nn.Sequential(layer))
    assert type(layer) is OneDNNLinear
    x = torch.randn(3, 48, 7).transpose(1, 2)  # rows read through a strided view
    expected_x, got_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    grad = torch.randn(3, 7, 40)
    expected = reference(expected_x)
    got = layer(got_x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    expected.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(got_x.grad, expected_x.grad, rtol=1e-5, atol=1e-5)
    for name, parameter in reference.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(dict(layer.named_parameters())[name].grad, parameter.grad, rtol=1e-5, atol=1e-5)


def test_other_inputs_go_through_torch():
    layer = torch.nn.Linear(8, 4)
    multiply_with_onednn(torch.nn.Sequential(layer))
    assert layer(torch.randn(0, 8)).shape == (0, 4)
    layer.double()
    x = torch.randn(2, 8, dtype=torch.float64)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_torch_compile_traces_torch_s_own_product():
    """Inductor's oneDNN lowering takes frozen weights only: a compiled graph keeps torch's op."""
    layer = torch.nn.Linear(16, 8)
    multiply_with_onednn(torch.nn.Sequential(layer))
    x = torch.randn(4, 16)
    compiled = torch.compile(layer)
    torch.testing.assert_close(compiled(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_a_layer_pickles_with_its_class():
    import pickle

    layer = torch.nn.Linear(4, 2)
    multiply_with_onednn(torch.nn.Sequential(layer))
    assert type(pickle.loads(pickle.dumps(layer))) is OneDNNLinear


def test_a_model_keeps_its_weights_and_its_output_layer(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"), dtype=torch.float32)
    keys = list(model.state_dict())
    linears = sum(type(module) is torch.nn.Linear for module in model.modules())
    assert multiply_with_onednn(model) == linears - 1
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # a different row count every batch
    assert list(model.state_dict()) == keys


def test_training_with_onednn_reaches_the_weights_of_blas(tiny_models, tmp_path):
    """The same run with either kind of product: equal weights within rounding, and the
    products are really different code (the last bits differ)."""
    import json

    from safetensors.torch import load_file

    import modelloop

    data = tmp_path / "data.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i}+{i}?"}, {"role": "assistant", "content": str(2 * i)}]}
        for i in range(40)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    weights = {}
    for matmul in ("blas", "onednn"):
        out = tmp_path / matmul
        modelloop.sft(
            {
                "model": str(tiny_models("qwen2")),
                "data": [str(data)],
                "tuner": "lora",
                "max_steps": 6,
                "batch_size": 4,
                "lr": 2e-3,
                "packing": False,
                "padding_free": False,  # rows where oneDNN multiplies are padded: the same batches either way
                "gradient_checkpointing": True,
                "cpu_matmul": matmul,
                "output_dir": str(out),
            }
        )
        weights[matmul] = load_file(out / "model" / "adapter_model.safetensors")
    assert_equal_within_rounding_but_not_bit_for_bit(weights)


def test_dpo_with_onednn_trains_as_with_blas(tiny_models, tmp_path):
    """rlhf's DPO multiplies with oneDNN too (TRL's collator padding its batches to a
    multiple of 8 tokens): the same losses step by step, from weights that differ in their
    last bits. (Not the weights within rounding: with the adapter starting where the
    reference is, Adam's first steps turn gradients of nearly nothing into full steps.)"""
    import json

    from safetensors.torch import load_file

    import modelloop

    data = tmp_path / "pairs.jsonl"
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
            "chosen": [{"role": "assistant", "content": str(2 * i)}],
            "rejected": [{"role": "assistant", "content": str(2 * i + 1)}],
        }
        for i in range(24)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    weights, losses = {}, {}
    for matmul in ("blas", "onednn"):
        out = tmp_path / matmul
        config = {"model": str(tiny_models("qwen2")), "data": [str(data)], "method": "dpo", "tuner": "lora"}
        config |= {"max_steps": 6, "batch_size": 4, "lr": 2e-3, "logging_steps": 1, "cpu_matmul": matmul}
        modelloop.rlhf({**config, "output_dir": str(out)})
        weights[matmul] = load_file(out / "model" / "adapter_model.safetensors")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[matmul] = [record["loss"] for record in records if "loss" in record]
    assert any(not torch.equal(weights["onednn"][name], tensor) for name, tensor in weights["blas"].items())
    assert len(losses["blas"]) == 6 and losses["blas"][-1] < losses["blas"][0]  # it learns
    torch.testing.assert_close(torch.tensor(losses["onednn"]), torch.tensor(losses["blas"]), rtol=0, atol=2e-3)


def assert_equal_within_rounding_but_not_bit_for_bit(weights):
    """The products are really different code (the last bits differ), the weights the same."""
    assert any(not torch.equal(weights["onednn"][name], tensor) for name, tensor in weights["blas"].items())
    for name, tensor in weights["blas"].items():
        torch.testing.assert_close(weights["onednn"][name], tensor, rtol=1e-3, atol=1e-4)  # Adam steps of 2e-3 each


@pytest.mark.parametrize(
    "vendor, packing, max_length, expected",
    [
        ("AuthenticAMD", True, 2048, True),  # packed rows: one shape
        ("AuthenticAMD", False, 128, True),  # unpacked, short: few widths
        ("AuthenticAMD", False, 1024, False),  # unpacked, long: a shape for every width
        ("GenuineIntel", True, 2048, False),  # MKL's own processors: MKL multiplies as fast
        (None, True, 2048, True),
    ],
)
def test_auto_takes_onednn_where_batches_come_in_few_shapes_and_mkl_is_not_at_home(
    vendor, packing, max_length, expected, monkeypatch, tiny_models
):
    from modelloop.config import TrainConfig
    from modelloop.models import cpu_linear
    from modelloop.parallel.plan import ParallelPlan
    from modelloop.parallel.world import World
    from modelloop.stages.train import multiplies_with_onednn

    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the rule for a CPU, wherever it runs
    config = TrainConfig(model=str(tiny_models("qwen2")), data=["x.jsonl"], packing=packing, max_length=max_length)
    plan = ParallelPlan(strategy="single", world=World(nproc=1), mesh={"dp": 1})
    assert multiplies_with_onednn(config, plan) is expected
    for forced, chosen in (("onednn", True), ("blas", False)):
        assert multiplies_with_onednn(config.model_copy(update={"cpu_matmul": forced}), plan) is chosen
