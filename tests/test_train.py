"""Training stages on tiny local models: every tuner learns, runs are complete and resumable."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import modelloop
from conftest import REPO
from modelloop import hookimpl
from modelloop.config import ConfigError
from modelloop.errors import MissingLibraryError, UnknownNameError
from modelloop.plugins import PluginInfo, get_plugin_manager


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    subprocess.run(
        [sys.executable, REPO / "examples" / "make_demo_data.py", out, "--count", "200"],
        check=True,
        capture_output=True,
    )
    return out


def settings(tiny_models, demo, tmp_path, **overrides):
    return {
        "model": str(tiny_models("qwen2")),
        "data": [str(demo / "tasks.jsonl")],
        "max_length": 64,
        "batch_size": 8,
        "lr": 2e-3,
        "max_steps": 30,
        "logging_steps": 5,
        "output_dir": str(tmp_path / "run"),
        **overrides,
    }


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


@pytest.mark.parametrize(
    "tuner, options, lr",
    [
        ("full", {}, 1e-3),
        ("lora", {"rank": 8}, 2e-3),
        ("dora", {"rank": 8}, 2e-3),
        ("galore", {"rank": 8, "update_proj_gap": 10}, 1e-3),
        ("qlora", {"rank": 8}, 2e-3),
    ],
)
def test_loss_falls_with_every_tuner(tuner, options, lr, tiny_models, demo, tmp_path):
    result = modelloop.sft(settings(tiny_models, demo, tmp_path, tuner=tuner, tuner_options=options, lr=lr))
    logged = losses(tmp_path / "run")
    assert len(logged) == 6
    assert logged[-1] < logged[0] * 0.9, logged
    assert result["metrics"]["train_loss"] > 0


def test_logs_carry_the_speed_of_each_window(tiny_models, demo, tmp_path):
    modelloop.sft(settings(tiny_models, demo, tmp_path, max_steps=10))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    speeds = [record["tokens_per_second"] for record in logged if "loss" in record]
    assert len(speeds) == 2 and all(speed > 0 for speed in speeds)


def test_a_step_that_takes_the_whole_data_is_warned_about_before_training(
    tiny_models, demo, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("modelloop.log._said", set())
    modelloop.sft(settings(tiny_models, demo, tmp_path, max_length=1024, max_steps=2))
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "takes the whole data" in line]
    assert line.startswith("modelloop: warning: one step of 8 rows takes the whole data (200 examples, packed into ")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tuner", ["lora", "full"])
@pytest.mark.parametrize("packing", [True, False])
def test_sft_trains_on_a_gpu_in_mixed_precision(tuner, packing, tiny_models, demo, tmp_path):
    """The GPU path: batches pinned (unpacked ones crashed there), bf16 mixed precision,
    the loss in the output layer, packed rows without a quadratic mask."""
    result = modelloop.sft(
        settings(tiny_models, demo, tmp_path, tuner=tuner, packing=packing, lr=1e-3 if tuner == "full" else 2e-3)
    )
    logged = losses(tmp_path / "run")
    assert logged[-1] < logged[0] * 0.9, logged
    compute = json.loads((tmp_path / "run" / "manifest.json").read_text())["compute"]
    assert compute["precision"] == {"compute": "bf16", "mixed": True, "trainable": "fp32"}
    assert compute["loss"] == "in the output layer, chunked linear cross-entropy"
    assert compute["attention"] in (
        ("flash_attention_3", "flash_attention_2", "flex_attention")
        if packing
        else ("flash_attention_3", "flash_attention_2", "sdpa")
    )
    assert result["metrics"]["peak_memory_mib"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="needs a CUDA GPU and liger-kernel",
)
@pytest.mark.parametrize("packing", [True, False])
def test_sft_with_liger_trains_through_its_fused_loss(packing, tiny_models, demo, tmp_path):
    modelloop.sft(settings(tiny_models, demo, tmp_path, accelerators=["liger"], packing=packing))
    logged = losses(tmp_path / "run")
    assert logged[-1] < logged[0] * 0.9, logged
    compute = json.loads((tmp_path / "run" / "manifest.json").read_text())["compute"]
    assert compute["loss"] == "in the output layer, liger's fused linear cross-entropy"


@pytest.mark.parametrize("tuner", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_weights(tuner, tiny_models, demo, tmp_path):
    """Checkpointed layers are recomputed with the same dropout masks: the same weights come out."""
    from safetensors.torch import load_file

    weights = {}
    for checkpointing in (False, True):
        out = tmp_path / str(checkpointing)
        modelloop.sft(settings(tiny_models, demo, out, tuner=tuner, max_steps=8, gradient_checkpointing=checkpointing))
        weights[checkpointing] = load_file(next((out / "run" / "model").glob("*.safetensors")))
    assert weights[True].keys() == weights[False].keys()
    for name, expected in weights[False].items():
        torch.testing.assert_close(weights[True][name], expected, rtol=1e-4, atol=1e-6)


def test_the_run_folder_is_complete(tiny_models, demo, tmp_path):
    modelloop.sft(settings(tiny_models, demo, tmp_path, max_steps=10))
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["stage"] == "sft"
    assert manifest["base_model"] == str(tiny_models("qwen2"))
    assert manifest["config"]["tuner"] == "lora" and manifest["adapter"] is True
    assert manifest["plugins"]["modelloop-plugin-tuner-lora"] == "0.1.0"
    assert set(manifest["files"]) >= {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"}
    assert manifest["data"]["stats"]["examples"] == 200
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "config.json").read_text())["max_steps"] == 10
    tokenizer_config = json.loads((run / "model" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in (
        tokenizer_config.get("chat_template") or (run / "model" / "chat_template.jinja").read_text()
    )


def test_adapter_reloads_with_plain_peft_and_gives_the_same_loss(tiny_models, demo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from modelloop.chat import resolve_chat_format
    from modelloop.data.packing import collate_padded
    from modelloop.data.tokenize import prepare_data
    from modelloop.models.loading import load_tokenizer, resolve_family

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join((demo / "tasks_eval.jsonl").read_text().splitlines(keepends=True)[:8]))
    result = modelloop.sft(
        settings(tiny_models, demo, tmp_path, max_steps=15, eval_data=[str(eval_file)], packing=False)
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"))
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "model").eval()
    tokenizer = load_tokenizer(tmp_path / "run" / "model")
    chat = resolve_chat_format(tokenizer, resolve_family("qwen2"))
    data = prepare_data([eval_file], tokenizer, chat, max_length=64)
    batch = collate_padded(data.input_ids, data.labels, tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert loss == pytest.approx(result["metrics"]["eval_loss"], abs=1e-5)
    with torch.no_grad():
        ours = modelloop.load_model(tmp_path / "run").model.eval()(**batch).logits
        theirs = model(**batch).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_a_full_run_loads_as_a_model_and_becomes_the_next_base(tiny_models, demo, tmp_path):
    modelloop.sft(settings(tiny_models, demo, tmp_path, tuner="full", max_steps=5, lr=1e-3))
    loaded = modelloop.load_model(tmp_path / "run")
    assert loaded.family.name == "qwen2" and not hasattr(loaded.model, "peft_config")
    second = modelloop.sft(
        settings(
            tiny_models, demo, tmp_path, model=str(tmp_path / "run"), max_steps=5, output_dir=str(tmp_path / "next")
        )
    )
    manifest = json.loads((tmp_path / "next" / "manifest.json").read_text())
    assert manifest["parent"] == "run"
    assert second["metrics"]["train_loss"] > 0


def test_pretraining_on_text_learns(tiny_models, tmp_path, demo):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"The number after {i} is {i + 1}."}) + "\n" for i in range(300)))
    modelloop.pt(settings(tiny_models, demo, tmp_path, data=[str(text)], tuner="full", lr=1e-3))
    logged = losses(tmp_path / "run")
    assert logged[-1] < logged[0] * 0.8


def test_eval_split_reports_eval_loss(tiny_models, demo, tmp_path):
    result = modelloop.sft(settings(tiny_models, demo, tmp_path, max_steps=10, eval_split=0.1, eval_steps=5))
    assert result["metrics"]["eval_loss"] > 0
    assert (
        sum("eval_loss" in json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        >= 2
    )


def test_lifecycle_hooks_fire_around_a_real_stage(tiny_models, demo, tmp_path):
    seen = []

    class Tracker:
        @hookimpl
        def before_stage(self, stage):
            seen.append(("before", stage))

        @hookimpl
        def on_log(self, step, metrics):
            if "loss" in metrics:
                seen.append(("log", step))

        @hookimpl
        def after_stage(self, result):
            seen.append(("after", sorted(result)))

    get_plugin_manager().add_plugin(Tracker(), PluginInfo("tracker", "1.0", builtin=False))
    modelloop.sft(settings(tiny_models, demo, tmp_path, max_steps=10))
    assert seen == [("before", "sft"), ("log", 5), ("log", 10), ("after", ["metrics", "run_dir"])]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tuner": "lorra"}, "Unknown tuner 'lorra'. Did you mean 'lora'?"),
        ({"tuner_options": {"rank": 0}}, "tuner_options for lora: rank must be a positive integer, got 0"),
        ({"lr": -1e-4}, "lr: Input should be greater than 0"),
        ({"max_length": 4096}, "max_length 4096 is longer than the model's context (2048 tokens)"),
        ({"tuner_options": {"rnak": 8}}, "unknown option 'rnak'"),
        ({"sampler": "shuffled"}, "Unknown sampler 'shuffled'"),
        ({"epochs": 0}, "epochs: Input should be greater than 0"),
    ],
)
def test_a_bad_config_fails_before_the_model_loads(overrides, message, tiny_models, demo, tmp_path, monkeypatch):
    import modelloop.models.loading

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(modelloop.models.loading, "load_model", never)
    with pytest.raises((ConfigError, UnknownNameError)) as raised:
        modelloop.sft(settings(tiny_models, demo, tmp_path, **overrides))
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "run").exists()


def test_qlora_without_bitsandbytes_is_a_clear_error(tiny_models, demo, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(MissingLibraryError, match="the qlora tuner needs bitsandbytes: pip install bitsandbytes"):
        modelloop.sft(settings(tiny_models, demo, tmp_path, tuner="qlora"))


def test_bad_data_stops_before_training(tiny_models, demo, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text((demo / "tasks.jsonl").read_text() + '{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(modelloop.data.sources.DataError, match=f"{bad}:201: messages must end with an assistant turn"):
        modelloop.sft(settings(tiny_models, demo, tmp_path, data=[str(bad)]))
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "failed"


def test_empty_data_is_named(tiny_models, demo, tmp_path):
    from modelloop.data.sources import DataError

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=f"no usable examples in {empty} \\(no records\\)"):
        modelloop.sft(settings(tiny_models, demo, tmp_path, data=[str(empty)]))


def test_a_missing_data_file_fails_before_any_run_folder_is_made(tiny_models, demo, tmp_path, monkeypatch):
    from modelloop.config import ConfigError

    monkeypatch.setenv("MODELLOOP_HOME", str(tmp_path / "home"))
    missing = tmp_path / "typo.jsonl"
    with pytest.raises(ConfigError, match=f"^{missing}: no such data file or folder$"):
        modelloop.sft(settings(tiny_models, demo, tmp_path, data=[f"{missing}#0.5"], output_dir=None))
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("manifest.json"))


def sft_process(tiny_models, demo, out, *extra):
    command = [
        sys.executable, "-m", "modelloop", "sft", "--model", str(tiny_models("qwen2")), "--data", str(demo / "tasks.jsonl"),
        "--max-length", "64", "--lr", "2e-3", "--max-steps", "30", "--save-steps", "10", "--logging-steps", "10",
        "--output-dir", str(out), *extra,
    ]  # fmt: skip
    return command


def final_adapter(run):
    from safetensors.torch import load_file

    return load_file(run / "model" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, demo, tmp_path_factory, subprocess_env):
    """``sft_process``'s run, from its start to its end in one go."""
    whole = tmp_path_factory.mktemp("uninterrupted") / "run"
    subprocess.run(sft_process(tiny_models, demo, whole), env=subprocess_env, check=True, capture_output=True)
    return whole


def test_a_killed_run_resumes_to_the_same_weights(tiny_models, demo, uninterrupted, tmp_path, subprocess_env):
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        sft_process(tiny_models, demo, killed), env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "checkpoint-10").exists():  # killed with 20 steps to go
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert json.loads((killed / "manifest.json").read_text())["status"] == "running"
    assert not (killed / "model").exists()
    resume_to_the_end(killed, subprocess_env)
    assert_same_adapter(killed, uninterrupted)


def resume_to_the_end(run, env):
    """``modelloop sft --resume RUN``, which completes the run; returns the process."""
    resumed = subprocess.run(
        [sys.executable, "-m", "modelloop", "sft", "--resume", str(run)], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    return resumed


def assert_same_adapter(run, expected_run):
    expected, got = final_adapter(expected_run), final_adapter(run)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_ctrl_c_saves_the_step_under_way_and_resume_ends_at_the_same_weights(
    tiny_models, demo, uninterrupted, tmp_path, subprocess_env
):
    stopped = tmp_path / "stopped"
    command = sft_process(tiny_models, demo, stopped)
    command[command.index("--save-steps") + 1] = "1000"  # no checkpoint but the one Ctrl-C saves
    command[command.index("--logging-steps") + 1] = "1"
    process = subprocess.Popen(command, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = stopped / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and '"loss"' in metrics.read_text()):  # a first step trained
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    (checkpoint,) = (stopped / "checkpoints").glob("checkpoint-*")
    step = int(checkpoint.name.rsplit("-", 1)[1])
    assert 1 <= step < 30  # the step under way when Ctrl-C came, not the run's end
    assert f"modelloop: stopped at step {step}, saved in {checkpoint}; --resume {stopped} goes on" in stderr
    manifest = json.loads((stopped / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"].startswith(f"KeyboardInterrupt: stopped at step {step}")
    assert not (stopped / "model").exists()
    assert f"resuming from {checkpoint}" in resume_to_the_end(stopped, subprocess_env).stdout
    assert_same_adapter(stopped, uninterrupted)


def test_a_second_ctrl_c_stops_at_once_and_the_handler_is_put_back():
    from transformers import TrainerControl

    from modelloop.training import StopWithCheckpoint

    before, stop, control = signal.getsignal(signal.SIGINT), StopWithCheckpoint(), TrainerControl()
    with stop.catching():
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
        stop.on_step_end(None, None, control)
        assert control.should_save and control.should_training_stop
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_from_a_named_checkpoint(tiny_models, demo, tmp_path, subprocess_env):
    run = tmp_path / "run"
    first = sft_process(tiny_models, demo, run)
    first[first.index("--max-steps") + 1] = "20"
    subprocess.run(first, env=subprocess_env, check=True, capture_output=True)
    first_attempt = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 21, "lo')  # a write cut short by a crash or a full disk
    resumed = subprocess.run(
        [sys.executable, "-m", "modelloop", "sft", "--resume", str(run / "checkpoints" / "checkpoint-10")],
        env=subprocess_env, capture_output=True, text=True,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (
        f"metrics.jsonl:{len(first_attempt) + 1}: the last line was cut short (a write interrupted); left out"
        in resumed.stderr
    )
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in logged if "loss" in record] == [10, 20]  # steps 11-20 ran again, logged once
    assert logged[0] == first_attempt[0] and logged[-1] != first_attempt[-1]  # up to step 10 kept, the rest replaced
    assert f"resuming from {run / 'checkpoints' / 'checkpoint-10'}" in resumed.stdout
    losses = [record["loss"] for record in logged if "loss" in record]
    metrics = json.loads((run / "manifest.json").read_text())["metrics"]
    assert metrics["train_loss"] == pytest.approx(sum(losses) / 2, rel=1e-3)  # the whole run, not steps 11-20
    assert metrics["train_loss_last"] == losses[-1]


def test_an_adapter_trained_on_an_adapter_run_keeps_the_first_adapter(lora_run, tmp_path):
    """LoRA on top of a LoRA run: the first adapter is merged into a base the run keeps."""
    tuned, data = lora_run
    second = tmp_path / "second"
    modelloop.sft(
        {
            "model": str(tuned),
            "data": [str(data)],
            "max_steps": 2,
            "lr": 1e-12,
            "max_length": 64,
            "output_dir": str(second),
        }
    )
    manifest = json.loads((second / "manifest.json").read_text())
    assert (
        manifest["base_model"] == str((second / "base").resolve())
        and manifest["parent"] == json.loads((tuned / "manifest.json").read_text())["id"]
    )
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        first_logits = modelloop.load_model(tuned).model(input_ids=ids).logits
        second_logits = modelloop.load_model(second).model(input_ids=ids).logits
    torch.testing.assert_close(second_logits, first_logits, rtol=1e-4, atol=1e-4)  # the new adapter has barely moved
