"""LMDeploy engine: flag translation, back-end choice and refusals on CPU, the session over
`modelloop serve` standing in for its server, `export --for lmdeploy`; the real server
where LMDeploy and a GPU exist."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
import sys

import pytest
from click.testing import CliRunner

import modelloop_engine_lmdeploy as lmdeploy
from conftest import modelloop_serve
from modelloop.cli import build_cli
from modelloop.errors import EngineError
from modelloop.export import written_config
from modelloop.inference.launch import DEFAULTS
from modelloop.inference.types import GenerationRequest, SamplingParams
from modelloop.registry import ENGINES, get_registry

OPTIONS = {**DEFAULTS, "served_name": "tuned", "port": 23333}


def check(source, exporter: str) -> str | None:
    """What ``export --for lmdeploy`` asks the engine about an export of ``source``."""
    config, chat_template = written_config(source, exporter)
    return lmdeploy.LMDEPLOY.check_export(config, exporter, chat_template)


def flags(argv: list[str]) -> str:
    return " ".join(argv[3:])


def test_every_option_becomes_an_lmdeploy_flag():
    options = {
        **OPTIONS,
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.5,
        "max_model_len": 4096,
        "dtype": "bfloat16",
        "quantization": "awq",
        "max_batch_size": 64,
        "extra_args": ["--eager-mode", "--log-level", "INFO"],
    }
    argv, env = lmdeploy.command("/envs/lmdeploy/bin/python", "/models/base", {}, options, backend="turbomind")
    assert argv[:6] == ["/envs/lmdeploy/bin/python", "-m", "lmdeploy", "serve", "api_server", "/models/base"]
    for expected in [
        "--model-name tuned",
        "--server-name 127.0.0.1",
        "--server-port 23333",
        "--tp 2",
        "--cache-max-entry-count 0.5",
        "--dtype bfloat16",
        "--backend turbomind",
        "--session-len 4096",
        "--max-batch-size 64",
        "--model-format awq",
    ]:
        assert expected in flags(argv)
    assert argv[-3:] == ["--eager-mode", "--log-level", "INFO"] and env == {}


def test_unset_options_leave_lmdeploy_its_own_defaults():
    argv, _ = lmdeploy.command("python3", "/models/base", {}, OPTIONS)
    for absent in ("--backend", "--session-len", "--max-batch-size", "--model-format", "--adapters"):
        assert absent not in argv  # LMDeploy picks TurboMind where it has the architecture, else PyTorch
    assert "--dtype auto" in flags(argv) and "--tp 1" in flags(argv)


def test_adapters_are_served_by_the_pytorch_back_end():
    adapters = {"sft": "/runs/a/model", "dpo": "/runs/b/model"}
    for backend in (None, "pytorch"):
        argv, _ = lmdeploy.command("python3", "/models/base", adapters, OPTIONS, backend=backend)
        assert "--backend pytorch" in flags(argv)
        assert "--adapters sft=/runs/a/model dpo=/runs/b/model" in flags(argv)
    with pytest.raises(EngineError, match="TurboMind back end serves no LoRA adapters: use backend=pytorch"):
        lmdeploy.command("python3", "/models/base", adapters, OPTIONS, backend="turbomind")


def test_values_lmdeploy_would_refuse_are_refused_before_anything_starts(tiny_models):
    with pytest.raises(EngineError, match="dtype must be one of auto, float16, bfloat16, got 'float32'"):
        lmdeploy.command("python3", "/models/base", {}, {**OPTIONS, "dtype": "float32"})
    engine = get_registry(ENGINES).get("lmdeploy")
    with pytest.raises(EngineError, match="backend must be one of turbomind, pytorch, got 'tensorrt'"):
        engine.start(tiny_models("qwen2"), options={"backend": "tensorrt"})
    with pytest.raises(EngineError, match="LMDeploy engine: unknown option 'max_lora_ranks'"):
        engine.start(tiny_models("qwen2"), options={"max_lora_ranks": 8})


@pytest.mark.skipif(importlib.util.find_spec("lmdeploy") is not None, reason="checks the refusal where it is absent")
def test_a_missing_lmdeploy_is_refused_before_anything_starts(tiny_models):
    with pytest.raises(EngineError, match="lmdeploy is not installed in this environment.*--engine-python"):
        get_registry(ENGINES).get("lmdeploy").start(tiny_models("qwen2"))


def test_the_session_over_a_stand_in_server(lora_run, tiny_models, tmp_path, monkeypatch):
    """The engine's start with `modelloop serve` in place of LMDeploy's server, from an
    --engine-python of its own: the LoRA run goes to the PyTorch back end as base plus
    adapter, answers by default, streams, and refuses what LMDeploy cannot do while serving."""
    translate, launched = lmdeploy.command, []

    def stand_in(python, model, adapters, options, *, backend=None):
        launched.append(translate(python, model, adapters, options, backend=backend)[0])
        return modelloop_serve(python, model, dict(adapters), dict(options))

    monkeypatch.setattr(lmdeploy, "command", stand_in)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    session = (
        get_registry(ENGINES)
        .get("lmdeploy")
        .start(lora_run[0], options={"python": str(python), "startup_timeout": 120})
    )
    try:
        (argv,) = launched
        assert argv[0] == str(python) and "--backend pytorch" in flags(argv)
        assert f"--adapters tuned={(lora_run[0] / 'model').resolve()}" in flags(argv)
        assert session.models == [tiny_models("qwen2").name, "tuned"]
        greedy = SamplingParams(max_tokens=6, temperature=0)
        request = GenerationRequest(messages=[{"role": "user", "content": "What is 2+1?"}], params=greedy)
        unnamed, tuned = session.generate([request, dataclasses.replace(request, model="tuned")])
        assert unnamed.choices[0].text == tuned.choices[0].text and unnamed.prompt_tokens > 0
        assert "".join(delta.text for delta in session.stream(request)) == unnamed.choices[0].text
        with pytest.raises(EngineError, match="cannot load or unload adapters while serving; name them when it"):
            session.load_adapter("again", str(lora_run[0] / "model"))
        with pytest.raises(EngineError, match="takes text prompts only and returns no token ids"):
            session.generate([GenerationRequest(prompt=[1, 2, 3], params=greedy)])
    finally:
        session.close()
    assert session.process.process.poll() is not None


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral", "gemma2", "phi3", "qwen2_vl"])
def test_the_tiny_families_export_for_lmdeploy(family, tiny_models):
    assert check(tiny_models(family), "merged") is None


@pytest.mark.parametrize(
    ("family", "quant", "reason"),
    [
        ("qwen2", "gptq-int4", None),
        ("llama", "awq-int4", None),
        ("mistral", "gptq-int4", "MistralForCausalLM runs on LMDeploy's pytorch back end only; only TurboMind"),
        ("qwen2", "fp8", "compressed-tensors only as pack-quantized 4-bit int.*not float-quantized 8-bit float"),
        ("qwen2", "bnb-nf4", "LMDeploy does not load bitsandbytes weights"),
    ],
)
def test_quantised_exports_are_checked_against_what_lmdeploy_loads(family, quant, reason, tiny_models):
    refused = check(tiny_models(family), quant)
    assert refused is None if reason is None else re.search(reason, refused or "")


def reshaped(tiny_models, tmp_path, family: str, **config_fields) -> str:
    """A copy of a tiny model with fields of its config.json replaced."""
    folder = tmp_path / family
    shutil.copytree(tiny_models(family), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_fields}))
    return str(folder)


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}


@pytest.mark.parametrize(
    ("family", "fields", "reason"),
    [
        ("qwen2", {"quantization_config": GPTQ}, None),
        ("qwen2", {"quantization_config": {**GPTQ, "desc_act": True}}, "only symmetric, without act-order"),
        ("qwen2", {"quantization_config": {**GPTQ, "group_size": 64}}, "in groups of 128"),
        ("mistral", {"quantization_config": GPTQ}, "pytorch back end only; only TurboMind loads GPTQ"),
        ("qwen2", {"quantization_config": AWQ}, None),
        ("mistral", {"quantization_config": {**AWQ, "version": "gemv"}}, None),  # PyTorch takes any AWQ
        ("qwen2", {"quantization_config": {"quant_method": "hqq"}}, "LMDeploy does not load hqq weights"),
        ("qwen2", {"architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2"}, "no Starcoder2ForCausalLM"),
    ],
)
def test_gptq_and_awq_shaped_configs(family, fields, reason, tiny_models, tmp_path):
    refused = check(reshaped(tiny_models, tmp_path, family, **fields), "merged")
    assert refused is None if reason is None else reason in (refused or "")


def test_a_model_without_a_chat_template_is_refused(tiny_models, tmp_path):
    folder = reshaped(tiny_models, tmp_path, "qwen2")
    for name in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / "qwen2" / name).unlink(missing_ok=True)
    tokenizer_config = tmp_path / "qwen2" / "tokenizer_config.json"
    tokenizer_config.write_text(
        json.dumps({k: v for k, v in json.loads(tokenizer_config.read_text()).items() if k != "chat_template"})
    )
    assert check(folder, "merged") == (
        "the tokenizer has no chat template, and LMDeploy would chat with its plain 'base' one instead"
    )


def test_export_for_lmdeploy_refuses_before_writing_and_writes_what_it_loads(tiny_models, tmp_path):
    def export(*args):
        return CliRunner().invoke(build_cli(), ["export", str(tiny_models("qwen2")), *map(str, args)])

    refused = export("--out", tmp_path / "fp8", "--quant", "fp8", "--for", "lmdeploy")
    assert refused.exit_code == 2 and "the lmdeploy engine cannot load this fp8 export: LMDeploy" in refused.output
    assert not (tmp_path / "fp8").exists()
    written = export("--out", tmp_path / "merged", "--for", "lmdeploy")
    assert written.exit_code == 0, written.output
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("lmdeploy") is None, reason="needs lmdeploy (and a CUDA GPU)")
@pytest.mark.parametrize("backend", ["turbomind", "pytorch"])
def test_lmdeploy_serves_and_generates(backend, tiny_models):
    session = (
        get_registry(ENGINES)
        .get("lmdeploy")
        .start(tiny_models("qwen2"), options={"backend": backend, "gpu_memory_utilization": 0.3})
    )
    try:
        (answer,) = session.generate([GenerationRequest(prompt="hello", params=SamplingParams(max_tokens=4))])
        assert answer.choices[0].finish_reason in ("stop", "length")
    finally:
        session.close()
