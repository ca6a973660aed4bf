"""``modelloop serve``: an OpenAI-compatible HTTP API over any engine."""

from __future__ import annotations

from pathlib import Path

import click


def _adapter(text: str) -> tuple[str, str]:
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise click.BadParameter(f"{text!r}: expected NAME=PATH")
    return name, path


@click.command("serve")
@click.argument("model")
@click.option(
    "--engine",
    default="hf",
    show_default=True,
    help="Inference engine (see `modelloop plugins --hook register_engines`); auto: the fastest installed that runs here.",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 to serve other machines."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="MODELLOOP_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes.")
@click.option("--adapters", "adapters", multiple=True, help="Serve a LoRA adapter as a model: NAME=PATH (repeatable).")
@click.option("--served-name", help="The base model's name in the API (default: the folder name).")
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--engine-python",
    type=click.Path(dir_okay=False, exists=True),
    help="Python of the engine's own environment (vllm, sglang).",
)
@click.option(
    "--engine-option",
    "engine_options",
    multiple=True,
    help="An engine option: KEY=VALUE, e.g. tensor_parallel_size=2 (repeatable).",
)
@click.option(
    "--allow-remote-images",
    is_flag=True,
    help="Fetch http(s) image and audio URLs in chat requests (default: base64 data URLs only).",
)
@click.option(
    "--adapter-dir",
    "adapter_dirs",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Load adapters at run time (/v1/load_lora_adapter) only from under DIR (repeatable; default: the folders holding the --adapters; with neither, never).",
)
@click.option(
    "--max-queued",
    default=128,
    show_default=True,
    type=click.IntRange(min=0),
    help="Requests waiting for the engine (about 4 batches of 32); past it, 429.",
)
@click.option(
    "--request-timeout",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a request may wait for and spend in the engine (the openai client's own default: after it, nobody waits); past it, 503.",
)
@click.option(
    "--max-body-mb",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="The largest request body, in MiB (a few pictures as base64); past it, 413.",
)
@click.option(
    "--log",
    "log_dir",
    type=click.Path(file_okay=False),
    help="Log every request and answer, and take feedback on them (POST /v1/feedback), as JSONL under DIR "
    "(`modelloop data from-logs DIR` makes training data of them).",
)
@click.option(
    "--log-max-mb",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Begin a new log file once one holds this many MiB.",
)
def serve_command(
    model: str,
    engine: str,
    host: str,
    port: int,
    api_key: str | None,
    adapters: tuple[str, ...],
    served_name: str | None,
    max_batch_size: int,
    engine_python: str | None,
    engine_options: tuple[str, ...],
    allow_remote_images: bool,
    adapter_dirs: tuple[str, ...],
    max_queued: int,
    request_timeout: float,
    max_body_mb: int,
    log_dir: str | None,
    log_max_mb: int,
) -> None:
    """Serve MODEL (a model folder, hub id, run folder, or current:NAME: the run a recipe promoted) over the OpenAI API.

    SIGTERM or Ctrl-C stops it after the requests in flight are answered.
    """
    import uvicorn

    from modelloop.aliases import resolve_alias
    from modelloop.artifacts import is_run, run_id
    from modelloop.config import parse_assignments
    from modelloop.inference.choice import find_engine
    from modelloop.inference.request_log import RequestLog
    from modelloop.inference.server import Limits, create_app
    from modelloop.lifecycle import stage_lifecycle

    model = resolve_alias(model)  # current:NAME: the run a recipe promoted
    chosen = find_engine(engine)
    named = dict(_adapter(text) for text in adapters)
    for name, path in named.items():
        if not Path(path).is_dir():
            raise click.BadParameter(f"{name}={path}: no such adapter folder", param_hint="--adapters")
    options = {"served_name": served_name, "max_batch_size": max_batch_size, **parse_assignments(engine_options)}
    if engine_python:
        options["python"] = engine_python
    if (
        allow_remote_images and chosen.name == "hf"
    ):  # the built-in engine fetches them itself; the API lets them through
        options["allow_remote_images"] = True
    limits = Limits(
        batch_rows=max_batch_size,
        max_queued=max_queued,
        request_timeout=request_timeout,
        max_body_bytes=max_body_mb << 20,
    )
    folders = adapter_dirs or tuple(Path(path).resolve().parent for path in named.values())
    # the run the served model came from (a run folder, or the model folder inside one), for the log's lineage
    run = next((folder for folder in (Path(model), Path(model).parent) if is_run(folder)), None)
    origin = {"source": model, "run": run_id(run) if run is not None else None}
    request_log = RequestLog(log_dir, max_bytes=log_max_mb << 20) if log_dir else None  # before the model loads
    config = {
        "model": model,
        "engine": chosen.name,
        "host": host,
        "port": port,
        "adapters": named,
        "options": options,
        "log": log_dir,
        **limits.__dict__,
    }
    with stage_lifecycle("serve", config, Path(model)) as context:  # serve writes no folder: the model's stands in
        session = chosen.start(model, adapters=named, options=options)
        click.echo(
            f"modelloop: serving {', '.join(session.models)} with the {chosen.name} engine on http://{host}:{port}/v1",
            err=True,
        )
        app = create_app(
            session,
            api_key=api_key,
            allow_remote_images=allow_remote_images,
            adapter_dirs=folders,
            limits=limits,
            request_log=request_log,
            origin=origin,
        )
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
        context.result.update(models=list(session.models))
