"""Stage lifecycle hooks fire in order, with the stage's config, metrics and errors."""

from __future__ import annotations

import pytest

from modelloop import hookimpl
from modelloop.lifecycle import stage_lifecycle
from modelloop.plugins import PluginInfo, make_plugin_manager


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def before_stage(self, stage, config, run_dir):
        self.calls.append(("before", stage, dict(config), run_dir))

    @hookimpl
    def on_log(self, stage, step, metrics):
        self.calls.append(("log", stage, step, dict(metrics)))

    @hookimpl
    def after_stage(self, stage, result):
        self.calls.append(("after", stage, dict(result)))

    @hookimpl
    def on_stage_error(self, stage, error):
        self.calls.append(("error", stage, error))


@pytest.fixture
def recorder():
    manager = make_plugin_manager(
        {"MODELLOOP_LOAD_PLUGINS": "modelloop-plugin-tuner-lora"}
    )  # the LoRA run loads through its tuner
    recorder = Recorder()
    manager.add_plugin(recorder, PluginInfo("recorder", "1.0", builtin=False))
    return manager, recorder


def test_hook_before_stage(recorder, tmp_path):
    manager, plugin = recorder
    with stage_lifecycle("sft", {"lr": 1e-3}, tmp_path, manager):
        assert plugin.calls == [("before", "sft", {"lr": 1e-3}, tmp_path)]


def test_hook_on_log(recorder, tmp_path):
    manager, plugin = recorder
    with stage_lifecycle("sft", {}, tmp_path, manager) as stage:
        stage.log(10, {"loss": 2.5})
        stage.log(20, {"loss": 1.5})
    assert [call for call in plugin.calls if call[0] == "log"] == [
        ("log", "sft", 10, {"loss": 2.5}),
        ("log", "sft", 20, {"loss": 1.5}),
    ]


def test_hook_after_stage(recorder, tmp_path):
    manager, plugin = recorder
    with stage_lifecycle("export", {}, tmp_path, manager) as stage:
        stage.result["out"] = "merged"
    assert plugin.calls[-1] == ("after", "export", {"out": "merged"})


def test_hook_on_stage_error(recorder, tmp_path):
    manager, plugin = recorder
    failure = ValueError("bad record")
    with pytest.raises(ValueError):
        with stage_lifecycle("sft", {}, tmp_path, manager):
            raise failure
    assert plugin.calls[-1] == ("error", "sft", failure)
    assert not any(call[0] == "after" for call in plugin.calls)


def test_export_and_serve_run_inside_the_lifecycle(recorder, lora_run, tiny_models, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from modelloop.cli import build_cli
    from modelloop.plugins import set_plugin_manager

    manager, plugin = recorder
    set_plugin_manager(manager)
    run, _ = lora_run
    exported = CliRunner().invoke(build_cli(), ["export", str(run), "--merge", "--out", str(tmp_path / "merged")])
    assert exported.exit_code == 0, exported.output
    monkeypatch.setattr("uvicorn.run", lambda app, **options: None)  # a server stopped as soon as it started
    served = CliRunner().invoke(build_cli(), ["serve", str(tiny_models("qwen2")), "--served-name", "tiny"])
    assert served.exit_code == 0, served.output
    assert [call[:2] for call in plugin.calls] == [
        ("before", "export"),
        ("after", "export"),
        ("before", "serve"),
        ("after", "serve"),
    ]
    assert plugin.calls[0][3] == tmp_path / "merged" and plugin.calls[0][2]["quant"] == "merged"
    assert plugin.calls[1][2] == {"out": str(tmp_path / "merged"), "format": "merged"}
    assert plugin.calls[3][2] == {"models": ["tiny"]}
