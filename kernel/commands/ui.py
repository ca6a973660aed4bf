"""``modelloop ui``: the runs, lineage, launching and a playground in the browser."""

from __future__ import annotations

import click


@click.command("ui")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 to serve other machines."
)
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key",
    envvar="MODELLOOP_API_KEY",
    help="Require the key: 'Authorization: Bearer KEY', or open the page once with ?key=KEY.",
)
def ui_command(host: str, port: int, api_key: str | None) -> None:
    """Browse runs (their curves, config, files and lineage), compare two, launch sft, pt
    or rlhf from a form, and chat with runs side by side, in the browser.

    Runs are found where `modelloop runs` finds them ($MODELLOOP_HOME/runs, else ./runs).
    Ctrl-C stops it, and stops the runs it launched (they stay resumable).
    """
    import uvicorn

    from modelloop.ui.app import create_app

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo("modelloop: warning: the ui launches runs and reads run folders; on a shared network give --api-key")
    click.echo(f"modelloop ui: http://{host}:{port}/")
    uvicorn.run(create_app(api_key), host=host, port=port, log_level="warning")
