"""vLLM engine: flag translation and refusals on CPU; the real server where vLLM and a GPU exist."""

from __future__ import annotations

import importlib.util

import pytest

import modelloop_engine_vllm as vllm
from modelloop.errors import EngineError
from modelloop.inference.launch import DEFAULTS
from modelloop.registry import ENGINES, get_registry


def test_options_become_vllm_flags():
    options = {
        **DEFAULTS,
        "served_name": "tuned",
        "port": 8123,
        "tensor_parallel_size": 2,
        "max_model_len": 4096,
        "quantization": "fp8",
        "max_lora_rank": 16,
        "extra_args": ["--enforce-eager"],
    }
    argv, env = vllm.command("/envs/vllm/bin/python", "/models/base", {"sft": "/runs/a/model"}, options)
    assert argv[:3] == ["/envs/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = " ".join(argv[3:])
    for expected in [
        "--model /models/base",
        "--served-model-name tuned",
        "--host 127.0.0.1",
        "--port 8123",
        "--tensor-parallel-size 2",
        "--gpu-memory-utilization 0.9",
        "--dtype auto",
        "--max-model-len 4096",
        "--quantization fp8",
        "--enable-lora --max-lora-rank 16",
        "--lora-modules sft=/runs/a/model",
    ]:
        assert expected in flags
    assert argv[-1] == "--enforce-eager"
    assert env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def test_unknown_options_and_a_missing_vllm_are_refused(tiny_models):
    engine = get_registry(ENGINES).get("vllm")
    with pytest.raises(EngineError, match="vLLM engine: unknown option 'tensor_parallel'"):
        engine.start(tiny_models("qwen2"), options={"tensor_parallel": 2})
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(EngineError, match="vllm is not installed in this environment.*--engine-python"):
            engine.start(tiny_models("qwen2"))


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (and a CUDA GPU)")
def test_vllm_serves_and_generates(tiny_models):
    from modelloop.inference.types import GenerationRequest, SamplingParams

    session = get_registry(ENGINES).get("vllm").start(tiny_models("qwen2"), options={"gpu_memory_utilization": 0.3})
    try:
        (answer,) = session.generate([GenerationRequest(prompt="hello", params=SamplingParams(max_tokens=4))])
        assert answer.choices[0].finish_reason in ("stop", "length")
    finally:
        session.close()
