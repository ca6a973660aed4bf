"""SGLang engine: flag translation and refusals on CPU; the real server where SGLang and a GPU exist."""

from __future__ import annotations

import importlib.util

import pytest

import modelloop_engine_sglang as sglang
from modelloop.errors import EngineError
from modelloop.inference.launch import DEFAULTS
from modelloop.registry import ENGINES, get_registry


def test_options_become_sglang_flags():
    options = {
        **DEFAULTS,
        "served_name": "tuned",
        "port": 30000,
        "tensor_parallel_size": 4,
        "max_model_len": 8192,
        "gpu_memory_utilization": 0.8,
    }
    argv, env = sglang.command("python3", "/models/base", {"sft": "/runs/a/model", "dpo": "/runs/b/model"}, options)
    assert argv[:3] == ["python3", "-m", "sglang.launch_server"]
    flags = " ".join(argv[3:])
    for expected in [
        "--model-path /models/base",
        "--served-model-name tuned",
        "--port 30000",
        "--tp-size 4",
        "--context-length 8192",
        "--mem-fraction-static 0.8",
        "--enable-lora --max-lora-rank 64",
        "--lora-paths sft=/runs/a/model dpo=/runs/b/model",
    ]:
        assert expected in flags
    assert "--quantization" not in flags and env == {}


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="checks the refusal where sglang is absent")
def test_a_missing_sglang_is_refused_before_anything_starts(tiny_models):
    with pytest.raises(EngineError, match="sglang is not installed in this environment"):
        get_registry(ENGINES).get("sglang").start(tiny_models("qwen2"))


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang (and a CUDA GPU)")
def test_sglang_serves_and_generates(tiny_models):
    from modelloop.inference.types import GenerationRequest, SamplingParams

    session = get_registry(ENGINES).get("sglang").start(tiny_models("qwen2"), options={"gpu_memory_utilization": 0.3})
    try:
        (answer,) = session.generate([GenerationRequest(prompt="hello", params=SamplingParams(max_tokens=4))])
        assert answer.choices[0].finish_reason in ("stop", "length")
    finally:
        session.close()
