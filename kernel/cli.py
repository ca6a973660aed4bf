"""The ``modelloop`` command line.

Each built-in command lives in its own module under ``modelloop.commands`` and is
imported only when it runs or when ``--help`` lists it; command modules keep torch and
friends inside their functions. Plugins add commands through ``register_commands``.

A ``ModelloopError`` is shown as one ``Error: ...`` line with exit code 2; ``--debug``
(or ``MODELLOOP_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import click

from modelloop.errors import ModelloopError
from modelloop.log import quiet_library_notices
from modelloop.plugins import get_plugin_manager
from modelloop.threads import settle_threads
from modelloop.version import __version__

#: command name -> "module:attribute" of its click command.
BUILTIN_COMMANDS: Mapping[str, str] = {
    "plugins": "modelloop.commands.plugins:plugins_command",
    "new-plugin": "modelloop.commands.new_plugin:new_plugin_command",
    "new-model": "modelloop.commands.new_model:new_model_command",
    "data": "modelloop.commands.data:data_command",
    "sft": "modelloop.commands.train:sft_command",
    "pt": "modelloop.commands.train:pt_command",
    "rlhf": "modelloop.commands.train:rlhf_command",
    "serve": "modelloop.commands.serve:serve_command",
    "export": "modelloop.commands.export:export_command",
    "infer": "modelloop.commands.infer:infer_command",
    "eval": "modelloop.commands.infer:eval_command",
    "chat": "modelloop.commands.chat:chat_command",
    "run": "modelloop.commands.run:run_command",
    "plan": "modelloop.commands.plan:plan_command",
    "runs": "modelloop.commands.runs:runs_command",
    "ui": "modelloop.commands.ui:ui_command",
}


#: Commands that never use DeepSpeed, which accelerate imports whenever it is installed
#: (on every ``save_pretrained``: 0.15 s and a "Setting accelerator to CPU" line). In a
#: process that runs only the command, it is left out; the training commands decide by
#: their strategy (``modelloop.stages.common.leave_out_unused_libraries``).
NEVER_DEEPSPEED = frozenset({"new-model", "data", "export", "infer", "eval", "serve", "chat"})


class UserError(click.ClickException):
    """A ModelloopError on its way to the terminal: one line, exit code 2."""

    exit_code = 2


class ModelloopGroup(click.Group):
    """A click group that imports built-in commands on demand and reports user errors plainly."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*BUILTIN_COMMANDS, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in BUILTIN_COMMANDS:
            module_name, attribute = BUILTIN_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module_name), attribute)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModelloopError as error:
            if ctx.params.get("debug"):
                raise
            raise UserError(str(error)) from error


def build_cli() -> click.Group:
    """The root command with every loaded plugin's commands added."""

    @click.group(cls=ModelloopGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="modelloop")
    @click.option(
        "--debug", is_flag=True, envvar="MODELLOOP_DEBUG", help="Show tracebacks of errors (and what -v shows)."
    )
    @click.option(
        "-v",
        "--verbose",
        is_flag=True,
        envvar="MODELLOOP_VERBOSE",
        help="Show the libraries' own warnings and progress bars.",
    )
    @click.pass_context
    def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
        """Load, tune, align, export, serve and evaluate open language models.

        Model families, tuners, rewards and engines are plugins: see `modelloop plugins`.
        """
        if debug or verbose:
            os.environ["MODELLOOP_VERBOSE"] = "1"  # for the processes this one starts
        else:
            quiet_library_notices()
        settle_threads()
        if (ctx.obj or {}).get("owns_process") and ctx.invoked_subcommand in NEVER_DEEPSPEED:
            from modelloop.process import leave_out

            leave_out(["deepspeed"])

    manager = get_plugin_manager()
    owners: dict[str, str] = {}
    for plugin, call in manager.implementations("register_commands"):
        version = manager.info[plugin].version
        before = dict(cli.commands)
        try:
            call(cli=cli)
        except Exception as error:  # third-party code: isolate it
            cli.commands.clear()
            cli.commands.update(before)
            manager.report(plugin, version, f"register_commands ignored: it raised {error!r}")
            continue
        added = [name for name, command in cli.commands.items() if before.get(name) is not command]
        for name in added:
            holder = "modelloop" if name in BUILTIN_COMMANDS else owners.get(name)
            if holder is None:
                owners[name] = plugin
                continue
            if name in before:
                cli.commands[name] = before[name]
            else:
                del cli.commands[name]
            manager.report(plugin, version, f"command {name!r} ignored: {holder} already provides it")
        manager.commands[plugin] = [name for name in added if owners.get(name) == plugin]
    return cli


def main(argv: Sequence[str] | None = None, *, owns_process: bool = False) -> None:
    """Run one command line; ``owns_process``: nothing else runs in this interpreter after
    it (``modelloop.process``), which lets a training command leave unused libraries out."""
    build_cli().main(args=argv, prog_name="modelloop", obj={"owns_process": owns_process})


def console() -> None:
    """The ``modelloop`` console script and ``python -m modelloop``: run the command, then
    end the process without tearing the interpreter down."""
    from modelloop.process import end

    try:
        main(owns_process=True)
    except SystemExit as exit:  # click always ends this way, errors included
        end(exit.code)
    end(0)
