"""An engine session behind the OpenAI API for as long as a block runs: for clients that
only speak HTTP (an evaluation harness in its own Python), without a ``modelloop serve``
process of its own.

A session that already is a server (``RemoteSession``: vLLM, SGLang, ...) is used as it
is; an in-process one (``hf``) gets the built-in server on a free loopback port, in a
thread of this process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from modelloop.errors import EngineError
from modelloop.parallel.world import free_port

STARTUP_SECONDS = 60.0


@contextmanager
def openai_url(session: Any) -> Iterator[str]:
    """The base URL (ending in ``/v1``) at which ``session`` answers while the block runs."""
    url = getattr(session, "url", None)
    if url is not None:
        yield f"{url}/v1"
        return
    import uvicorn

    from modelloop.inference.server import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(session), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="modelloop-openai-url", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise EngineError(f"the built-in server did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join()
