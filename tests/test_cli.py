"""The command line: plugin commands, `modelloop plugins`, and errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import modelloop
from modelloop import hookimpl
from modelloop.cli import build_cli
from modelloop.errors import ModelloopError
from modelloop.plugins import PluginInfo, make_plugin_manager, set_plugin_manager
from modelloop.specs import Reward


class Commands:
    @hookimpl
    def register_commands(self, cli):
        @cli.command(name="hello")
        @click.argument("who")
        def hello(who):
            """Greet someone."""
            click.echo(f"hello {who}")

        @cli.command(name="fail")
        def fail():
            """Fail the way a user mistake fails."""
            raise ModelloopError("the file data.jsonl does not exist")


class Rewards:
    @hookimpl
    def register_rewards(self, register):
        register(Reward(name="brevity", score=lambda prompts, completions, **columns: [1.0] * len(completions)))


@pytest.fixture
def manager():
    manager = make_plugin_manager({"MODELLOOP_LOAD_PLUGINS": ""})
    manager.add_plugin(Commands(), PluginInfo("modelloop-plugin-commands", "0.4", builtin=False))
    manager.add_plugin(Rewards(), PluginInfo("modelloop-plugin-rewards", "1.2", builtin=False))
    set_plugin_manager(manager)
    return manager


def invoke(*args):
    return CliRunner().invoke(build_cli(), list(args))


def test_hook_register_commands(manager):
    result = invoke("hello", "world")
    assert (result.exit_code, result.output) == (0, "hello world\n")
    assert "hello" in invoke("--help").output


def test_plugin_cannot_replace_a_builtin_command(manager, capsys):
    class Hijack:
        @hookimpl
        def register_commands(self, cli):
            @cli.command(name="plugins")
            def plugins():
                click.echo("hijacked")

    manager.add_plugin(Hijack(), PluginInfo("hijack", "1.0", builtin=False))
    result = invoke("plugins")
    assert "hijacked" not in result.stdout
    assert "modelloop-plugin-rewards" in result.stdout
    assert "hijack 1.0: command 'plugins' ignored: modelloop already provides it" in capsys.readouterr().err


def test_modelloop_error_is_one_line_and_exit_2(manager):
    result = invoke("fail")
    assert result.exit_code == 2
    assert result.output == "Error: the file data.jsonl does not exist\n"


def test_debug_shows_the_traceback(manager):
    result = invoke("--debug", "fail")
    assert isinstance(result.exception, ModelloopError)


def test_version():
    result = invoke("--version")
    assert result.output == f"modelloop, version {modelloop.__version__}\n"


def test_plugins_json_lists_versions_hooks_and_registrations(manager):
    listed = json.loads(invoke("plugins", "--json").stdout)
    assert listed == [
        {
            "name": "modelloop-plugin-commands",
            "version": "0.4",
            "builtin": False,
            "hooks": ["register_commands"],
            "registered": {"command": ["hello", "fail"]},
            "clashes": [],
        },
        {
            "name": "modelloop-plugin-rewards",
            "version": "1.2",
            "builtin": False,
            "hooks": ["register_rewards"],
            "registered": {"reward": ["brevity"]},
            "clashes": [],
        },
    ]


def test_plugins_text_and_hook_filter_shows_builtins_beside_installed(manager):
    output = invoke("plugins", "--hook", "register_rewards").output
    assert output.startswith("modelloop.builtin.rewards ")
    assert "(built-in)\n  hooks: register_rewards\n  reward: exact, accuracy," in output
    assert output.endswith("modelloop-plugin-rewards 1.2\n  hooks: register_rewards\n  reward: brevity\n")
    assert "modelloop.builtin.templates" not in output


def test_plugins_shows_each_clash_under_the_plugins_in_it(manager):
    manager.add_plugin(Rewards(), PluginInfo("modelloop-plugin-also-brevity", "0.1", builtin=False))
    output = invoke("plugins").output
    clash = "  clash: reward 'brevity' is registered by both modelloop-plugin-rewards and modelloop-plugin-also-brevity, so neither is used"
    assert (
        output.count(clash) == 2
        and "modelloop-plugin-commands 0.4\n  hooks: register_commands\n  command: hello, fail\n" in output
    )
    assert "MODELLOOP_BLOCK_PLUGINS=modelloop-plugin-rewards" in output


def test_plugins_all_adds_builtins(manager):
    listed = json.loads(invoke("plugins", "--all", "--json").stdout)
    builtins = [plugin["name"] for plugin in listed if plugin["builtin"]]
    assert builtins == [name for name, info in manager.info.items() if info.builtin]


def test_unknown_hook_filter_is_a_usage_error(manager):
    result = invoke("plugins", "--hook", "register_rewardz")
    assert result.exit_code == 2
    assert "register_rewards" in result.output


def test_console_script_reports_errors_without_traceback(subprocess_env, tmp_path):
    (tmp_path / "modelloop-plugin-taken").mkdir()
    completed = subprocess.run(
        [sys.executable, "-m", "modelloop", "new-plugin", "reward", "taken", "--dir", str(tmp_path)],
        env=subprocess_env,
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith("Error: ")
    assert "already exists" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_training_help_shows_what_most_runs_set_first_and_explains_every_option():
    for stage in ("sft", "pt", "rlhf"):
        help_text = CliRunner().invoke(build_cli(), [stage, "--help"]).output
        command = build_cli().get_command(click.Context(build_cli()), stage)
        names = [parameter.opts[0] for parameter in command.params]
        assert names[:8] == [
            "--model",
            "--data",
            "--tuner",
            "--max-steps",
            "--epochs",
            "--batch-size",
            "--lr",
            "--max-length",
        ]
        assert all(parameter.help for parameter in command.params), [p.opts[0] for p in command.params if not p.help]
        assert ("--packing" in help_text) is (stage != "rlhf")  # rlhf does not pack
        assert "[default: 1024]" in help_text
    rlhf = build_cli().get_command(click.Context(build_cli()), "rlhf")
    assert [parameter.opts[0] for parameter in rlhf.params][8] == "--method"


class NeedsALibrary:
    @hookimpl
    def register_exporters(self, register):
        from modelloop.specs import Exporter

        register(Exporter(name="needy", export=lambda source, out, **options: out, requires=("no_such_library_here",)))


def test_a_spec_whose_library_is_missing_is_refused_in_one_line(manager, tmp_path):
    """One check and one error for every kind of spec that names the libraries it needs."""
    from modelloop.errors import MissingLibraryError, require_libraries

    manager.add_plugin(NeedsALibrary(), PluginInfo("modelloop-plugin-needy", "1.0", builtin=False))
    result = invoke("export", str(tmp_path), "--quant", "needy", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert (
        result.output.strip().splitlines()[-1]
        == "Error: the needy export needs no_such_library_here: pip install no_such_library_here"
    )
    with pytest.raises(MissingLibraryError, match="^the needy tuner needs no_such_library_here"):
        require_libraries(type("Spec", (), {"name": "needy", "requires": ("no_such_library_here",)})(), "tuner")
