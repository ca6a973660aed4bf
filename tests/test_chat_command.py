"""`modelloop chat`: multi-turn, streamed, through any engine."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from modelloop import hookimpl
from modelloop.cli import build_cli
from modelloop.inference.types import Delta
from modelloop.plugins import PluginInfo, get_plugin_manager
from modelloop.specs import Engine


class CountingSession:
    """Answers with how many user turns it was given, in two streamed pieces."""

    models = ["counter"]
    context_length = 100
    closed = False

    def stream(self, request):
        users = sum(message["role"] == "user" for message in request.messages)
        yield Delta(index=0, text=f"{users} user turn")
        yield Delta(index=0, text="s" if users > 1 else "")
        yield Delta(index=0, finish_reason="stop")

    def close(self):
        CountingSession.closed = True

    def load_adapter(self, name, path):
        raise ValueError("no adapters")

    def unload_adapter(self, name):
        raise ValueError("no adapters")


class Counter:
    @hookimpl
    def register_engines(self, register):
        register(Engine(name="counter", start=lambda model, **options: CountingSession()))


def test_the_conversation_is_kept_until_reset():
    get_plugin_manager().add_plugin(Counter(), PluginInfo("counter", "1.0", builtin=False))
    result = CliRunner().invoke(
        build_cli(), ["chat", "some-model", "--engine", "counter"], input="hi\nand again\n/reset\nfresh\n/exit\n"
    )
    assert result.exit_code == 0, result.output
    answers = [line.split("model> ", 1)[1] for line in result.stdout.splitlines() if "model> " in line]
    assert answers == ["1 user turn", "2 user turns", "1 user turn"]
    assert CountingSession.closed


def test_chat_with_a_real_model_ends_at_end_of_input(tiny_models, subprocess_env):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelloop",
            "chat",
            str(tiny_models("qwen2")),
            "--max-tokens",
            "5",
            "--temperature",
            "0",
        ],
        input="hello\nwhat now\n",
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.count("model> ") == 2
