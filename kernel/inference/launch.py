"""What engine plugins that launch a server share: options, the model source, the start-up.

An engine plugin supplies only its command line (the translation of modelloop's options
to its flags) and its adapter route; ``start_server`` does the rest the same way for
every engine.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from modelloop.errors import EngineError
from modelloop.inference.remote import RemoteSession, ServerProcess
from modelloop.options import complete
from modelloop.parallel.world import free_port

#: Options every launched engine takes (``--engine-option KEY=VALUE`` on the command line).
DEFAULTS: dict[str, Any] = {
    "python": None,  # the Python of the engine's own environment (default: this one)
    "served_name": None,
    "port": None,
    "tensor_parallel_size": 1,
    "max_model_len": None,
    "gpu_memory_utilization": 0.9,
    "dtype": "auto",
    "quantization": None,
    "max_lora_rank": 64,
    "startup_timeout": 900,
    "extra_args": [],
    "max_batch_size": None,  # accepted for every engine; launched engines batch on their own
    "threads": None,  # the engine process's CPU threads (OMP_NUM_THREADS); default: its own choice
}


def model_and_adapters(
    model: str | Path, adapters: Mapping[str, str | Path] | None, served_name: str | None
) -> tuple[str, str, dict[str, str], str | None]:
    """The base model to launch, its served name, the adapters to serve by name, and the
    model a request without a name goes to.

    A LoRA run is served as an adapter named after the run (or ``served_name``) on its
    base, and is the default: asking "the run" must not answer with its base.
    """
    from modelloop.models.loading import resolve_model_source

    source = resolve_model_source(model)
    named = {name: str(Path(path).resolve()) for name, path in (adapters or {}).items()}
    if source.adapter is not None:
        own = served_name or Path(str(model)).name
        return source.base, Path(source.base).name, {own: str(Path(source.adapter).resolve()), **named}, own
    return source.base, served_name or Path(str(model)).name, named, None


def start_server(
    name: str,
    module: str,
    model: str | Path,
    adapters: Mapping[str, str | Path] | None,
    options: Mapping[str, Any] | None,
    command: Callable[[str, str, Mapping[str, str], Mapping[str, Any]], tuple[list[str], dict[str, str]]],
    *,
    adapter_route: str | None,
    unload_route: str | None,
    token_prompts: bool = True,
) -> RemoteSession:
    """Launch an engine's OpenAI-compatible server and return a session talking to it.

    :param module: the engine's import name, checked first when it runs in this Python.
    :param command: ``command(python, base_model, adapters, options) -> (argv, env)``.
    :param adapter_route: where it loads adapters while serving (None: only at the start);
        ``unload_route`` and ``token_prompts`` as for ``RemoteSession``.
    """
    try:
        options = complete(dict(options or {}), DEFAULTS)
    except ValueError as error:
        raise EngineError(f"{name} engine: {error}") from None
    python = options["python"] or sys.executable
    if python == sys.executable and importlib.util.find_spec(module) is None:
        raise EngineError(
            f"{module} is not installed in this environment; install it, or pass --engine-python "
            f"with the Python of an environment that has it (its torch and transformers pins differ)"
        )
    base, served, named, default = model_and_adapters(model, adapters, options["served_name"])
    options = {**options, "served_name": served, "port": options["port"] or free_port()}
    argv, env = command(python, base, named, options)
    if options["threads"]:
        env = {**env, "OMP_NUM_THREADS": str(options["threads"])}
    process = ServerProcess(argv, url=f"http://127.0.0.1:{options['port']}", env=env, name=name)
    try:
        process.wait_healthy(float(options["startup_timeout"]))
    except BaseException:  # Ctrl-C or a failed start: never leave the server behind
        process.stop(grace=10)
        raise
    return RemoteSession(
        process.url,
        process=process,
        context_length=options["max_model_len"],
        adapter_route=adapter_route,
        unload_route=unload_route,
        default_model=default,
        token_prompts=token_prompts,
    )
