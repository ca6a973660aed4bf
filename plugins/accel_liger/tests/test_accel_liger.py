"""The liger accelerator: a clear refusal on a CPU machine, the real kernels on a GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import modelloop
from modelloop.config import ConfigError
from modelloop.errors import MissingLibraryError
from modelloop.registry import ACCELERATORS, get_registry

HAS_GPU_AND_LIGER = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def test_liger_is_registered_for_the_families_it_patches():
    liger = get_registry(ACCELERATORS).get("liger")
    assert liger.needs_cuda and liger.requires == ("liger_kernel",)
    assert {"llama", "qwen2", "qwen3"} <= set(liger.model_types)


@pytest.mark.skipif(HAS_GPU_AND_LIGER, reason="checks the refusal on machines without a GPU or liger-kernel")
def test_without_gpu_or_liger_training_stops_before_loading(tiny_models, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    with pytest.raises(
        (MissingLibraryError, ConfigError), match="the liger accelerator (needs liger_kernel|runs on CUDA GPUs only)"
    ):
        modelloop.sft(
            {
                "model": str(tiny_models("qwen2")),
                "data": [str(data)],
                "accelerators": ["liger"],
                "output_dir": str(tmp_path / "run"),
            }
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU_AND_LIGER, reason="needs a CUDA GPU and liger-kernel")
def test_liger_patches_a_model_and_it_still_trains(tiny_models, tmp_path):
    from modelloop.models.loading import load_model

    loaded = load_model(tiny_models("qwen2"), device_map="cuda")
    model = get_registry(ACCELERATORS).get("liger").apply(loaded.model, loaded.family)
    assert any("Liger" in type(module).__name__ for module in model.modules())
    batch = loaded.tokenizer(["hello world"] * 2, return_tensors="pt").to("cuda")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
