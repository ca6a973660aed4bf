"""`modelloop new-plugin`: a scaffolded package installs, is discovered, and works."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from modelloop.builtin.full_tuner import FULL
from modelloop.cli import build_cli
from modelloop.plugins import PluginInfo, make_plugin_manager, set_plugin_manager
from modelloop.registry import KINDS as REGISTRY_KINDS
from modelloop.registry import REWARDS, get_registry
from modelloop.scaffold import KINDS, kernel_requirement, scaffold_plugin
from modelloop.testing import Workspace, checks_for, run_check


def test_third_party_reward_plugin_installs_and_is_found(tmp_path, subprocess_env, monkeypatch):
    created = CliRunner().invoke(build_cli(), ["new-plugin", "reward", "my_reward", "--dir", str(tmp_path)])
    assert created.exit_code == 0, created.output
    package = tmp_path / "modelloop-plugin-my-reward"
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            site,
            package,
        ],
        check=True,
        capture_output=True,
    )
    env = {**subprocess_env, "PYTHONPATH": str(site), "MODELLOOP_LOAD_PLUGINS": "modelloop-plugin-my-reward"}

    listed = subprocess.run(
        [sys.executable, "-m", "modelloop", "plugins", "--json"], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(listed.stdout) == [
        {
            "name": "modelloop-plugin-my-reward",
            "version": "0.1.0",
            "builtin": False,
            "hooks": ["register_rewards"],
            "registered": {"reward": ["my_reward"]},
            "clashes": [],
        }
    ]

    monkeypatch.syspath_prepend(str(site))
    manager = make_plugin_manager({"MODELLOOP_LOAD_PLUGINS": "modelloop-plugin-my-reward"})
    reward = get_registry(REWARDS, manager).get("my_reward")
    assert reward.score(["q"], ["", "one two three"]) == [1.0, 0.25]

    generated_test = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
        env=env,
        capture_output=True,
        text=True,
        cwd=package,
    )
    assert generated_test.returncode == 0, generated_test.stdout + generated_test.stderr
    assert "3 passed" in generated_test.stdout  # the entry point, and the kit's two checks

    command = [sys.executable, "-m", "modelloop", "plugins", "check", "modelloop-plugin-my-reward"]
    checked = subprocess.run(command, env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.splitlines()[-1] == "modelloop-plugin-my-reward: 2 passed, 0 failed, 0 skipped"


def load_scaffolded(kind: str, tmp_path: Path):
    """Scaffold a plugin of ``kind`` and register its module in a fresh manager, beside the
    repository's plugins (whose tiny models the conformance kit checks it on)."""
    package = scaffold_plugin(kind, f"demo-{kind}", tmp_path)
    (module_path,) = package.glob("modelloop_*.py")
    spec = importlib.util.spec_from_file_location(f"{module_path.stem}_{id(tmp_path)}", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    manager = make_plugin_manager()
    assert manager.add_plugin(module, PluginInfo(package.name, "0.1.0", builtin=False))
    set_plugin_manager(manager)
    return package, manager


def registered(kind: str, manager):
    (registry_kind,) = [k for k in REGISTRY_KINDS if k.hook == KINDS[kind].hook]
    return get_registry(registry_kind, manager).get(f"demo-{kind}")


def check_model(family, tmp_path):
    assert family.model_types == ("demo-model",) and "q_proj" in family.lora_targets


def check_template(template, tmp_path):
    import jinja2

    messages = [{"role": "user", "content": "hi"}]
    rendered = jinja2.Template(template.source).render(messages=messages, add_generation_prompt=True)
    assert rendered == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def check_dataset_format(dataset_format, tmp_path):
    record = {"question": "2+2?", "answer": "4"}
    assert dataset_format.matches(record)
    assert dataset_format.convert(record)["messages"][1] == {"role": "assistant", "content": "4"}
    with pytest.raises(ValueError, match="empty answer"):
        dataset_format.convert({"question": "?", "answer": " "})


def check_sampler(sampler, tmp_path):
    assert list(sampler.order([5, 50, 10], batch_size=2, seed=0)) == [1, 2, 0]


def check_tuner(tuner, tmp_path):
    import torch

    model = tuner.prepare(torch.nn.Sequential(torch.nn.Linear(2, 2)), {}, None)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == {"0.weight": False, "0.bias": True}


def check_parallel_strategy(strategy, tmp_path):
    from modelloop.parallel.plan import PlanRequest
    from modelloop.parallel.world import World

    request = PlanRequest(
        World(nproc=4), None, None, FULL, {}, batch_size=1, max_length=8, gradient_checkpointing=False, cuda=False
    )
    plan = strategy.plan(request)
    assert plan.mesh == {"dp": 4}
    assert plan.trainer_arguments["ddp_bucket_cap_mb"] == 100


def check_reward(reward, tmp_path):
    assert reward.score(["p"], ["a b"]) == [pytest.approx(1 / 3)]


def check_environment(environment, tmp_path):
    from modelloop.specs import Turn

    episode = environment.start({"prompt": "Count down from 2.", "start": 2})
    steps = [episode.step(Turn(text=text, number=n)) for n, text in enumerate(["2", "1", "0"], start=1)]
    assert [(step.reward, step.done) for step in steps] == [(1.0, False), (1.0, False), (1.0, True)]
    assert environment.start({"prompt": "Go."}, start_from=5).step(Turn(text="4")).done


def check_exporter(exporter, tmp_path):
    source = tmp_path / "run"
    source.mkdir()
    (source / "config.json").write_text("{}")
    out = exporter.export(source, tmp_path / "exported")
    assert (Path(out) / "config.json").read_text() == "{}"


def check_engine(engine, tmp_path):
    from modelloop.inference.types import GenerationRequest
    from modelloop.specs import EngineSession

    session = engine.start("model-dir")
    assert isinstance(session, EngineSession)
    request = GenerationRequest(messages=[{"role": "user", "content": "say this"}])
    assert session.generate([request])[0].choices[0].text == "say this"
    assert [delta.text for delta in session.stream(request)] == ["say this", ""]
    session.close()


CHECKS = {
    "model": check_model,
    "template": check_template,
    "dataset-format": check_dataset_format,
    "sampler": check_sampler,
    "tuner": check_tuner,
    "parallel-strategy": check_parallel_strategy,
    "reward": check_reward,
    "environment": check_environment,
    "exporter": check_exporter,
    "engine": check_engine,
}


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_every_registering_kind_scaffolds_working_code_that_passes_the_kit(kind, tmp_path, tiny_models):
    package, manager = load_scaffolded(kind, tmp_path)
    CHECKS[kind](registered(kind, manager), tmp_path)
    outcomes = [run_check(check, Workspace(tmp_path / "kit", tiny_models)) for check in checks_for(package.name)]
    assert [outcome.line() for outcome in outcomes if outcome.status == "failed"] == []


def test_command_kind_scaffolds_a_command(tmp_path):
    load_scaffolded("command", tmp_path)
    result = CliRunner().invoke(build_cli(), ["demo-command"])
    assert result.output == "hello from modelloop-plugin-demo-command\n"


def test_tracker_kind_scaffolds_a_metrics_log(tmp_path):
    _, manager = load_scaffolded("tracker", tmp_path)
    manager.hook.on_log(stage="sft", step=3, metrics={"loss": 0.5}, run_dir=tmp_path)
    line = json.loads((tmp_path / "demo-tracker.jsonl").read_text())
    assert line == {"stage": "sft", "step": 3, "loss": 0.5}


def test_every_kind_is_checked():
    assert set(KINDS) == set(CHECKS) | {"command", "tracker"}


def test_scaffold_declares_this_kernel_series(tmp_path):
    pyproject = (scaffold_plugin("reward", "ranged", tmp_path) / "pyproject.toml").read_text()
    assert f'dependencies = ["{kernel_requirement()}"]' in pyproject
    assert kernel_requirement("0.4.2") == "modelloop>=0.4,<0.5"
    assert kernel_requirement("2.1.0") == "modelloop>=2.1,<3"


@pytest.mark.parametrize("name", ["Bad", "1st", "has space", "", "foo-", "a--b", "x_-y"])
def test_bad_plugin_names_are_refused(name, tmp_path):
    result = CliRunner().invoke(build_cli(), ["new-plugin", "reward", name, "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert not any(tmp_path.iterdir())
