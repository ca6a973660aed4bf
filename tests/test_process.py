"""A process that runs one command: unused libraries left out of its imports, and a quick end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import modelloop.process
from modelloop.config import TrainConfig, build_config
from modelloop.stages.checks import check_training
from modelloop.stages.common import leave_out_unused_libraries


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_a_library_left_out_looks_uninstalled_to_the_libraries_that_look_for_it(subprocess_env):
    completed = run_python(
        "import importlib.util, sys\n"
        "from modelloop.process import leave_out\n"
        "import json\n"
        "print(leave_out(['deepspeed', 'json']))\n"  # json is imported already: it stays
        "import accelerate.accelerator\n"
        "from transformers.integrations import is_deepspeed_available\n"
        "print(sys.modules['deepspeed'], importlib.util.find_spec('deepspeed'), bool(is_deepspeed_available()))\n"
        "try:\n    import deepspeed\nexcept ImportError:\n    print('ImportError')\n",
        subprocess_env,
    )
    assert completed.stdout.split("\n")[:3] == ["['deepspeed']", "None None False", "ImportError"], completed.stderr


def test_end_joins_threads_runs_exit_handlers_and_keeps_the_exit_code(subprocess_env):
    completed = run_python(
        "import atexit, threading, time\n"
        "from modelloop.process import end\n"
        "atexit.register(lambda: print('handler'))\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()\n"
        "print('buffered', end='')\n"
        "end(3)\n"
        "print('not reached')\n",
        subprocess_env,
    )
    assert completed.returncode == 3
    assert completed.stdout.split() == ["bufferedthread", "handler"]
    completed = run_python("from modelloop.process import end\nend('why it failed')", subprocess_env)
    assert completed.returncode == 1 and completed.stderr.strip() == "why it failed"


def test_end_stops_idle_thread_pools_as_an_interpreter_exit_does(subprocess_env):
    """A pool used once and never shut down (torch.compile leaves one): its workers wait
    for the interpreter's shutdown signal, which end() gives."""
    completed = run_python(
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from modelloop.process import end\n"
        "pool = ThreadPoolExecutor(2)\n"
        "print(pool.submit(sum, [1, 2]).result())\n"
        "end(0)\n",
        subprocess_env,
    )
    assert completed.returncode == 0 and completed.stdout.split() == ["3"]


def checked_leave_out(monkeypatch, tiny_models, tmp_path, **config):
    """What the stage would leave out for ``config`` (recorded, not done)."""
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}) + "\n"
    )
    monkeypatch.setattr(modelloop.process, "leave_out", lambda names: list(names))
    config = build_config(TrainConfig, {"model": str(tiny_models("qwen2")), "data": [str(data)], **config})
    return leave_out_unused_libraries(config, check_training(config))


def test_only_libraries_the_run_does_not_need_are_left_out(monkeypatch, tiny_models, tmp_path):
    assert checked_leave_out(monkeypatch, tiny_models, tmp_path, tuner="lora") == ["bitsandbytes", "deepspeed"]
    assert checked_leave_out(monkeypatch, tiny_models, tmp_path, tuner="qlora") == ["deepspeed"]
    assert checked_leave_out(monkeypatch, tiny_models, tmp_path, tuner="lora", strategy="deepspeed") == ["bitsandbytes"]
    assert checked_leave_out(monkeypatch, tiny_models, tmp_path, tuner="galore") == ["deepspeed"]


def test_weights_stored_quantized_keep_every_library(monkeypatch, tiny_models, tmp_path):
    import shutil

    model = tmp_path / "quantized"
    shutil.copytree(tiny_models("qwen2"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
    )
    assert checked_leave_out(monkeypatch, tiny_models, tmp_path, model=str(model), tuner="lora") == []


def test_a_model_s_own_code_keeps_every_library(monkeypatch, tiny_models, tmp_path):
    assert checked_leave_out(monkeypatch, tiny_models, tmp_path, tuner="lora", trust_remote_code=True) == []


@pytest.mark.parametrize(
    "command, tuner, left_out", [("sft", "lora", True), ("pt", "lora", True), ("sft", "galore", False)]
)
def test_the_command_trains_without_unused_libraries_and_writes_the_whole_run(
    command, tuner, left_out, tiny_models, tmp_path, subprocess_env
):
    """galore_torch imports bitsandbytes: the galore tuner requires it, and keeps it."""
    data = tmp_path / "data.jsonl"
    row = (
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
        if command == "sft"
        else {"text": "two and two make four"}
    )
    data.write_text(json.dumps(row) * 1 + "\n")
    out = tmp_path / "run"
    argv = [
        command,
        "--model",
        str(tiny_models("qwen2")),
        "--data",
        str(data),
        "--tuner",
        tuner,
        "--max-steps",
        "2",
        "--batch-size",
        "1",
        "--output-dir",
        str(out),
    ]
    completed = run_python(
        "import atexit, sys\n"
        "atexit.register(lambda: print(sorted(m for m in ('bitsandbytes', 'deepspeed') if sys.modules.get(m) is not None)))\n"
        f"sys.argv = ['modelloop', *{argv!r}]\n"
        "from modelloop.cli import console\n"
        "console()\n",
        subprocess_env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == ("[]" if left_out else "['bitsandbytes']")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert {"adapter_model.safetensors" if tuner == "lora" else "model.safetensors", "tokenizer.json"} <= set(
        manifest["files"]
    )
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 1


def test_errors_keep_their_exit_code_and_line(subprocess_env, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "modelloop", "sft", "--model", str(tmp_path), "--data", "x.jsonl", "--tuner", "lorra"],
        env=subprocess_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "Error: Unknown tuner 'lorra'. Did you mean 'lora'?" in completed.stderr


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_freed_memory_is_reused_without_faulting_pages_in_again(subprocess_env):
    """A training step's pattern: the same 2 MiB tensors, 20 MiB of them, allocated and freed
    every step. Left to itself, glibc gives them back to the kernel in some runs and not in
    others (up to 5,088 page faults a step here), so only the kept case is asserted."""
    completed = run_python(
        "import resource, torch\n"
        "from modelloop.process import keep_freed_memory\n"
        "assert keep_freed_memory()\n"
        "def step():\n    tensors = [torch.ones(2 << 18) for _ in range(10)]\n"
        "for _ in range(5):\n    step()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(100):\n    step()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n",
        subprocess_env,
    )
    faults = int(completed.stdout)
    assert faults < 1000, faults  # over 100 steps
