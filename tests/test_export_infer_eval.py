"""export, infer and eval: a trained run becomes a plain transformers model, answers and scores."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import modelloop
from modelloop.cli import build_cli
from modelloop.registry import REWARDS, get_registry


def current_umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def invoke(*args):
    return CliRunner().invoke(build_cli(), [str(arg) for arg in args])


def greedy(model, tokenizer, prompts):
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model.generate(
            **encoded, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
        ).tolist()


def test_merged_export_loads_in_plain_transformers_and_answers_like_base_plus_adapter(lora_run, tmp_path):
    from peft import PeftModel

    run, _ = lora_run
    refused = invoke("export", run, "--out", tmp_path / "merged")
    assert refused.exit_code == 2 and "pass --merge" in refused.output
    result = invoke("export", run, "--out", tmp_path / "merged", "--merge", "--for", "vllm")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    base = json.loads((run / "manifest.json").read_text())["base_model"]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "model")
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {i}+1?"}], tokenize=False, add_generation_prompt=True
        )
        for i in range(5)
    ]
    assert greedy(merged, tokenizer, prompts) == greedy(adapted, tokenizer, prompts)
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o777 & ~current_umask()
    manifest = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert (manifest["stage"], manifest["parent"], manifest["format"]) == ("export", "tuned", "merged")
    assert (
        str((tmp_path / "merged").resolve()) in json.loads((run / "manifest.json").read_text())["exports"]
    )  # for the lineage


def test_export_refuses_what_the_engine_cannot_load(lora_run, tmp_path):
    run, _ = lora_run
    result = invoke("export", run, "--out", tmp_path / "q", "--quant", "bnb-nf4", "--for", "sglang")
    assert result.exit_code == 2 and "the sglang engine cannot load a bnb-nf4 export" in result.output
    assert not (tmp_path / "q").exists()


def test_an_option_the_exporter_does_not_read_is_refused_before_any_work(lora_run, tmp_path):
    run, _ = lora_run
    result = invoke("export", run, "--out", tmp_path / "m", "--merge", "--export-option", "dtype=bf16")
    assert result.exit_code != 0 and "the merged exporter has no option 'dtype'; its options: none" in result.output
    assert not (tmp_path / "m").exists()


def test_nf4_export_reloads_and_generates(tiny_models, tmp_path):
    # bitsandbytes' CPU kernels need layer widths divisible by 32, unlike the tiny preset's 688
    source = tmp_path / "model"
    shutil.copytree(tiny_models("qwen2"), source)
    config = AutoConfig.from_pretrained(source)
    config.intermediate_size = 512
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    result = invoke("export", source, "--out", tmp_path / "nf4", "--quant", "bnb-nf4")
    assert result.exit_code == 0, result.output
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    assert type(quantized.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "nf4")
    assert len(greedy(quantized, tokenizer, ["hello"])[0]) > 1


def test_infer_killed_half_way_writes_every_row_exactly_once(lora_run, tmp_path, subprocess_env):
    run, data = lora_run
    output = tmp_path / "out.jsonl"
    command = [
        sys.executable,
        "-m",
        "modelloop",
        "infer",
        str(run),
        "--input",
        str(data),
        "--output",
        str(output),
        "--batch-size",
        "2",
        "--max-tokens",
        "48",
        "--temperature",
        "1",
    ]
    process = subprocess.Popen(command, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not output.exists() or output.read_text().count("\n") < 6:
        assert process.poll() is None and time.monotonic() < deadline, "infer finished before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with output.open("a") as out:
        out.write('{"index": 999, "resp')  # a line cut short by the kill
    written_before = output.read_text().count("\n")
    assert written_before < 60
    subprocess.run(command, env=subprocess_env, check=True, capture_output=True)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(row["index"] for row in rows) == list(range(60))
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 0+1?"}] and rows[0]["reference"] == "1"


def test_eval_scores_models_side_by_side_and_records_it(lora_run, tiny_models, tmp_path, monkeypatch):
    run, data = lora_run
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "eval",
        tiny_models("qwen2"),
        run,
        "--data",
        data,
        "--metric",
        "accuracy",
        "--metric",
        "reward:exact",
        "--max-tokens",
        "4",
    )
    assert result.exit_code == 0, result.output
    header, base_line, run_line = result.stdout.strip().splitlines()
    assert header.split()[:3] == ["model", "accuracy", "reward:exact"]
    evaluations = json.loads((run / "manifest.json").read_text())["evaluations"][str(data)]
    assert 0.0 <= evaluations["accuracy"] <= 1.0 and evaluations["examples"] == 60
    eval_dir = tmp_path / "runs" / evaluations["run"]
    rows = [json.loads(line) for line in (eval_dir / "scored.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and set(rows[0]["scores"]) == {"accuracy", "reward:exact"}
    assert sum(row["scores"]["accuracy"] for row in rows) / 60 == pytest.approx(evaluations["accuracy"])


def test_hook_register_rewards_builtin_accuracy_and_exact():
    rewards = get_registry(REWARDS)
    completions = ["The answer is 42.", "42", [{"role": "assistant", "content": " 41 "}], "Paris."]
    solutions = ["42", "42", "41", "paris"]
    assert rewards.get("accuracy").score([""] * 4, completions, solution=solutions) == [1.0, 1.0, 1.0, 1.0]
    assert rewards.get("exact").score([""] * 4, completions, solution=solutions) == [0.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="needs a 'solution' column"):
        rewards.get("exact").score(["p"], ["c"])


def test_fp8_without_llmcompressor_says_how_to_get_it(lora_run, tmp_path):
    import importlib.util

    if importlib.util.find_spec("llmcompressor") is not None:
        pytest.skip("llmcompressor is installed here")
    result = invoke("export", lora_run[0], "--out", tmp_path / "fp8", "--quant", "fp8")
    assert result.exit_code == 2
    assert "pass --quant-python ENV/bin/python" in result.output
    assert not (tmp_path / "fp8").exists()


LLMCOMPRESSOR_PYTHON = __import__("os").environ.get("MODELLOOP_LLMCOMPRESSOR_PYTHON")


@pytest.fixture
def run_on_a_quantizable_model(tiny_models, lora_run, tmp_path):
    """A LoRA run on a tiny Qwen2 whose layer widths divide by 128 (GPTQ/AWQ group size)."""
    source = tmp_path / "base"
    shutil.copytree(tiny_models("qwen2"), source)
    config = AutoConfig.from_pretrained(source)
    config.intermediate_size = 512
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    modelloop.sft(
        {
            "model": str(source),
            "data": [str(lora_run[1])],
            "max_steps": 2,
            "max_length": 64,
            "output_dir": str(tmp_path / "run"),
        }
    )
    return tmp_path / "run"


@pytest.mark.skipif(
    not LLMCOMPRESSOR_PYTHON, reason="set MODELLOOP_LLMCOMPRESSOR_PYTHON to a Python with llmcompressor"
)
@pytest.mark.parametrize(
    "quant",
    [
        "fp8",
        "gptq-int4",
        pytest.param(
            "awq-int4",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(
                    not torch.cuda.is_available(), reason="llmcompressor 0.14's AWQ pins memory, which needs a GPU"
                ),
            ],
        ),
    ],
)
def test_llmcompressor_exports_reload_and_generate(quant, run_on_a_quantizable_model, tmp_path):
    out = tmp_path / quant
    result = invoke(
        "export", run_on_a_quantizable_model, "--out", out, "--quant", quant, "--quant-python", LLMCOMPRESSOR_PYTHON
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(greedy(model, tokenizer, ["hello"])[0]) > 1
    assert json.loads((out / "manifest.json").read_text())["format"] == quant


def test_calibrated_exports_need_calibration_data_for_a_plain_model(tiny_models, tmp_path):
    result = invoke(
        "export",
        tiny_models("qwen2"),
        "--out",
        tmp_path / "g",
        "--quant",
        "gptq-int4",
        "--quant-python",
        sys.executable,
    )
    assert result.exit_code == 2 and "give calibration data with --calibration FILE" in result.output
