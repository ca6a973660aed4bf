"""``modelloop plugins``: what is installed, which hooks it implements, what it registered;
``modelloop plugins check DIST``: whether a distribution's plugins keep their contract
(``modelloop.testing``, imported when the check runs)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import click

from modelloop.hooks import HOOK_NAMES
from modelloop.plugins import PluginManager, get_plugin_manager
from modelloop.registry import KINDS, get_registry


def describe_plugins(manager: PluginManager, *, include_builtins: bool, hook: str | None) -> list[dict[str, Any]]:
    """One dict per loaded plugin: name, version, builtin, hooks, names registered per kind,
    and the names it registered that another plugin registered too."""
    clashes = [clash for kind in KINDS for clash in get_registry(kind, manager).clashes()]
    described = []
    for name, info in manager.info.items():
        if info.builtin and not include_builtins:
            continue
        plugin = manager.get_plugin(name)
        hook_names = sorted(caller.name for caller in manager.get_hookcallers(plugin) or ())
        if hook is not None and hook not in hook_names:
            continue
        registered = {kind.kind: get_registry(kind, manager).registered_by(name) for kind in KINDS}
        if manager.commands.get(name):
            registered["command"] = manager.commands[name]
        described.append(
            {
                "name": name,
                "version": info.version,
                "builtin": info.builtin,
                "hooks": hook_names,
                "registered": {kind: names for kind, names in registered.items() if names},
                "clashes": [clash.describe() for clash in clashes if name in clash.plugins],
            }
        )
    return described


@click.group("plugins", invoke_without_command=True)
@click.option("--all", "include_builtins", is_flag=True, help="Include the plugins built into modelloop.")
@click.option("--hook", type=click.Choice(HOOK_NAMES), help="Only plugins implementing this hook, built-ins included.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def plugins_command(ctx: click.Context, include_builtins: bool, hook: str | None, as_json: bool) -> None:
    """List installed plugins, their hooks and what they registered (`plugins check DIST`: check one)."""
    if ctx.invoked_subcommand is not None:
        return
    # Asked about one hook, a user wants everything that answers it, the kernel's own included.
    described = describe_plugins(get_plugin_manager(), include_builtins=include_builtins or hook is not None, hook=hook)
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    if not described:
        click.echo("No plugins installed." if not include_builtins else "No plugins loaded.")
        return
    for plugin in described:
        suffix = " (built-in)" if plugin["builtin"] else ""
        click.echo(f"{plugin['name']} {plugin['version']}{suffix}")
        click.echo(f"  hooks: {', '.join(plugin['hooks'])}")
        for kind, names in plugin["registered"].items():
            click.echo(f"  {kind}: {', '.join(names)}")
        for clash in plugin["clashes"]:
            click.echo(f"  clash: {clash}")


@plugins_command.command("check", short_help="Check a plugin distribution against the contract.")
@click.argument("distribution")
@click.pass_context
def check_command(ctx: click.Context, distribution: str) -> None:
    """Check that DISTRIBUTION's plugins keep the contract of what they register.

    Runs modelloop's conformance kit on the CPU against tiny models it builds itself:
    one line per check (passed, failed, or skipped with the reason), then a summary.
    Exit code 1 when a check fails. DISTRIBUTION is a package name
    (modelloop-plugin-tuner-lora), or modelloop for the kernel's own plugins. Libraries'
    Python warnings are left out unless -v or --debug; --debug adds each failure's traceback.
    """
    import os
    import traceback
    import warnings

    from modelloop.testing import checks_for, run_check, temporary_workspace

    debug = bool(ctx.find_root().params.get("debug"))
    checks = checks_for(distribution)
    counts: Counter[str] = Counter()
    with temporary_workspace() as workspace, warnings.catch_warnings():
        if not os.environ.get("MODELLOOP_VERBOSE"):
            warnings.simplefilter("ignore")
        for check in checks:
            if check.slow:
                click.echo(f"running  {check.id} (this takes a while)", err=True)
            outcome = run_check(check, workspace)
            counts[outcome.status] += 1
            click.echo(f"{outcome.status:<8} {outcome.line()}")
            if debug and outcome.error is not None:
                click.echo("".join(traceback.format_exception(outcome.error)), err=True)
    summary = ", ".join(f"{counts[status]} {status}" for status in ("passed", "failed", "skipped"))
    click.echo(f"{distribution}: {summary}")
    if counts["failed"]:
        ctx.exit(1)
