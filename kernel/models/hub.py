"""Hub ids when the hub is out of reach: one line in well under two seconds, not a wait.

Asked for a file it cannot reach, huggingface_hub retries five times with back-off (about
25 s, a line per retry) before transformers gives up. modelloop asks once, with a short
timeout, whether the hub's host answers. When it does not, or ``HF_HUB_OFFLINE`` is set,
a hub id already in the local cache is loaded from there without a request, and any
other is refused in one line naming the id, the cache searched and what to do instead.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from urllib.parse import urlsplit

from modelloop.errors import ModelLoadError

PROBE_SECONDS = 1.0


class HubUnreachableError(ModelLoadError):
    """A hub id that is neither reachable nor in the local cache."""


@functools.cache
def hub_reachable() -> bool:
    """Whether a TCP connection to the hub's host (``HF_ENDPOINT``) opens within
    ``PROBE_SECONDS``, name lookup included: asked once per process."""
    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    address = (endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80))
    outcome: list[bool] = []
    done = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=PROBE_SECONDS).close()
            outcome.append(True)
        except OSError:
            pass
        finally:
            done.set()

    # A thread, because a name lookup (getaddrinfo) takes no timeout of its own.
    threading.Thread(target=connect, name="modelloop-hub-probe", daemon=True).start()
    done.wait(PROBE_SECONDS)
    return bool(outcome)


def is_cached(repo_id: str) -> bool:
    """Whether the hub cache holds ``repo_id``'s config (a model downloaded before)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def go_offline() -> None:
    """Load from the cache without requests from now on, in this process and the ones it starts."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # read at each call by huggingface_hub and transformers
    os.environ["HF_HUB_OFFLINE"] = "1"


def check_hub_id(repo_id: str) -> None:
    """Return when ``repo_id`` can be loaded: the hub answers, or the id is cached (then go
    offline so nothing waits on the hub). Otherwise raise ``HubUnreachableError``."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    if not offline and hub_reachable():
        return
    if is_cached(repo_id):
        go_offline()
        return
    reason = "HF_HUB_OFFLINE is set" if offline else f"the hub ({constants.ENDPOINT}) cannot be reached"
    raise HubUnreachableError(
        f"{repo_id}: {reason} and the model is not in the hub cache ({constants.HF_HUB_CACHE}); "
        f"download it where there is a network (hf download {repo_id}) or give a model folder instead of the id"
    )
