"""Hub ids: a model named by its id on the Hugging Face Hub or ModelScope, resolved once to
a local folder.

``org/name`` (or ``hf://org/name``) names a model on the Hugging Face Hub, through
``huggingface_hub``; ``modelscope://org/name`` one on ModelScope, through the ``modelscope``
package (``pip install 'modelloop[modelscope]'``). ``@REVISION`` after either pins a
branch, tag or commit: ``org/name@v1.0``, ``modelscope://org/name@<commit>``.

The id is resolved to a folder of the hub's own cache (``HF_HUB_CACHE``; ``MODELSCOPE_CACHE``)
once per command, before any data is read: downloaded with the library's progress bar,
resumed where an earlier download stopped, and remembered (``RESOLVED``, inherited by
the processes a command starts) so that the tokenizer, the weights, the family and every
worker read the same files. The revision it resolved to (the commit on the Hugging Face
Hub; on ModelScope the revision its cache names the snapshot after) goes into the run's
manifest (``Resolved.record``).

Asked for a file it cannot reach, huggingface_hub retries five times with back-off (about
25 s, a line per retry). modelloop asks once, with a short timeout, whether the hub's host
answers. When it does not, or the hub's offline switch is set (``HF_HUB_OFFLINE``;
``MODELSCOPE_OFFLINE``, modelloop's own for ModelScope), a model in the cache is taken from
there without a request, and any other is refused in one line naming the id, the cache
searched and the variables that change either.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import socket
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from modelloop.errors import MissingLibraryError, ModelLoadError

PROBE_SECONDS = 1.0
HUGGINGFACE = "huggingface"
MODELSCOPE = "modelscope"
#: hub -> the prefix that names it (the Hugging Face Hub's is optional).
SCHEMES = {HUGGINGFACE: "hf://", MODELSCOPE: "modelscope://"}
#: set by modelloop: the hub ids this process resolved (JSON: id as given -> ``Resolved``),
#: inherited by the processes it starts, which then read the same folders without asking.
RESOLVED = "MODELLOOP_HUB_MODELS"
#: ModelScope's client has no offline switch: modelloop's, named after ``HF_HUB_OFFLINE``.
MODELSCOPE_OFFLINE = "MODELSCOPE_OFFLINE"

#: weights in formats modelloop never loads (it loads safetensors only): not downloaded.
OTHER_WEIGHTS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.gguf"]
#: left out where only the config, tokenizer or processor is read (``modelloop plan``,
#: ``data check``, a recipe's ``--check``); the weights come when something loads them.
WEIGHTS = ["*.safetensors", *OTHER_WEIGHTS]

_ID = re.compile(r"(?P<id>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w.-][\w./-]*))?")


class HubUnreachableError(ModelLoadError):
    """A hub id that is neither reachable nor in the local cache."""


@dataclass(frozen=True)
class HubId:
    """A model named on a hub: which hub, its id there, and the revision asked for (None:
    the default branch)."""

    hub: str
    repo_id: str
    revision: str | None = None
    #: the hub was named (``hf://``, ``modelscope://``), not implied by an ``org/name`` shape
    explicit: bool = False

    @classmethod
    def parse(cls, text: str) -> HubId | None:
        """``org/name[@REVISION]``, ``hf://...`` or ``modelscope://...``; None for anything else."""
        hub, rest, explicit = HUGGINGFACE, text, False
        for name, prefix in SCHEMES.items():
            if text.startswith(prefix):
                hub, rest, explicit = name, text[len(prefix) :], True
        found = _ID.fullmatch(rest)
        if found is None or rest.startswith("."):
            return None
        return cls(hub, found["id"], found["revision"], explicit)

    def __str__(self) -> str:
        prefix = SCHEMES[MODELSCOPE] if self.hub == MODELSCOPE else ""
        return f"{prefix}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class Resolved:
    """A hub id resolved: the local folder, the hub, the id, the revision the folder holds
    (a commit on the Hugging Face Hub), and whether its weights were fetched too."""

    folder: str
    hub: str
    repo_id: str
    revision: str | None
    weights: bool = True

    def record(self) -> dict[str, str | None]:
        """What a run's manifest keeps of it (``base_model_hub``)."""
        return {"hub": self.hub, "id": self.repo_id, "revision": self.revision}


def hub_id_of(record: dict[str, str | None]) -> str:
    """The id, pinned to its revision, that a manifest's ``base_model_hub`` names."""
    return str(HubId(record["hub"] or HUGGINGFACE, record["id"] or "", record.get("revision")))


def resolve(hub_id: HubId, *, weights: bool = True) -> Resolved:
    """The local folder of ``hub_id``: downloaded (resumed) when the hub answers, else
    taken from the cache; the same folder for every later call in this process and the
    processes it starts. ``weights``: fetch the weights too (else config, tokenizer and
    the other small files only; a later call with weights completes the same revision)."""
    key = str(hub_id)
    known = remembered(key)
    if known is not None and (known.weights or not weights):
        return known
    pinned = hub_id if known is None or known.revision is None else HubId(hub_id.hub, hub_id.repo_id, known.revision)
    fetch = _from_modelscope if hub_id.hub == MODELSCOPE else _from_huggingface
    resolved = fetch(pinned, weights=weights)
    if known is None:
        where = "the ModelScope" if hub_id.hub == MODELSCOPE else "the hub"
        print(f"modelloop: {key}: revision {resolved.revision} in {where} cache ({resolved.folder})", file=sys.stderr)
    _remember(key, resolved)
    return resolved


def remembered(key: str) -> Resolved | None:
    """The resolution of hub id ``key`` made earlier in this process or the one that started it."""
    entry = _resolutions().get(key)
    if entry is None or not Path(entry["folder"]).is_dir():
        return None
    return Resolved(**entry)


def _resolutions() -> dict[str, dict]:
    try:
        found = json.loads(os.environ.get(RESOLVED) or "{}")
    except json.JSONDecodeError:
        return {}
    return found if isinstance(found, dict) else {}


def _remember(key: str, resolved: Resolved) -> None:
    os.environ[RESOLVED] = json.dumps({**_resolutions(), key: asdict(resolved)})


@functools.cache
def reachable(endpoint: str) -> bool:
    """Whether a TCP connection to ``endpoint``'s host opens within ``PROBE_SECONDS``, name
    lookup included: asked once per process and endpoint."""
    parts = urlsplit(endpoint)
    address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
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


def go_offline() -> None:
    """Load from the Hugging Face cache without requests from now on, in this process and
    the ones it starts."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # read at each call by huggingface_hub and transformers
    os.environ["HF_HUB_OFFLINE"] = "1"


def _not_cached(hub_id: HubId, reason: str, cache: object, variables: str, download: str) -> HubUnreachableError:
    return HubUnreachableError(
        f"{hub_id}: {reason} and the model is not in the {'ModelScope' if hub_id.hub == MODELSCOPE else 'hub'} "
        f"cache ({cache}); {variables}, set {'MODELSCOPE_CACHE' if hub_id.hub == MODELSCOPE else 'HF_HUB_CACHE'} "
        f"to a cache that holds it ({download} where there is a network), or give a model folder instead of the id"
    )


def _download_args(hub_id: HubId) -> str:
    """What the hub's command line (``hf download``, ``modelscope download``) is given."""
    return hub_id.repo_id + (f" --revision {hub_id.revision}" if hub_id.revision else "")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _from_huggingface(hub_id: HubId, *, weights: bool) -> Resolved:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = constants.HF_HUB_OFFLINE
    online = not offline and reachable(constants.ENDPOINT)
    reason = "HF_HUB_OFFLINE is set" if offline else f"the hub ({constants.ENDPOINT}) cannot be reached"
    try:
        folder = snapshot_download(
            hub_id.repo_id,
            revision=hub_id.revision,
            local_files_only=not online,
            ignore_patterns=OTHER_WEIGHTS if weights else WEIGHTS,
        )
    except IncompleteSnapshotError as error:
        raise HubUnreachableError(
            f"{hub_id}: {reason} and its copy in the hub cache is incomplete ({_first_line(error)}); "
            "run again where the hub answers: the download resumes"
        ) from None
    except LocalEntryNotFoundError:
        variables = "set HF_HUB_OFFLINE=0 to download it" if offline else "set HF_ENDPOINT to a mirror that answers"
        raise _not_cached(
            hub_id, reason, constants.HF_HUB_CACHE, variables, f"hf download {_download_args(hub_id)}"
        ) from None
    except GatedRepoError:
        raise HubUnreachableError(
            f"{hub_id}: the model is gated on the hub: accept its terms on its page, then log in (hf auth login, or set HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise HubUnreachableError(
            f"{hub_id}: no such model on the hub ({constants.ENDPOINT}), or it is private: check the id, or log in (hf auth login, or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise HubUnreachableError(
            f"{hub_id}: {hub_id.repo_id} has no revision {hub_id.revision!r} on the hub ({constants.ENDPOINT})"
        ) from None
    except HfHubHTTPError as error:
        raise HubUnreachableError(f"{hub_id}: the hub ({constants.ENDPOINT}) answered: {_first_line(error)}") from None
    if not online:
        go_offline()  # anything else asked of the hub in this run reads the cache at once
    return Resolved(str(folder), HUGGINGFACE, hub_id.repo_id, Path(folder).name, weights)


def _from_modelscope(hub_id: HubId, *, weights: bool) -> Resolved:
    if importlib.util.find_spec("modelscope") is None:
        raise MissingLibraryError(
            f"{hub_id}: ModelScope ids need the modelscope package: pip install 'modelloop[modelscope]'"
        )
    from modelscope import snapshot_download
    from modelscope.hub.api import HubApi
    from modelscope.hub.errors import CacheNotFound, HubError
    from requests.exceptions import HTTPError, RequestException

    offline = os.environ.get(MODELSCOPE_OFFLINE, "").strip().lower() in ("1", "true", "yes", "on")
    endpoint = "" if offline else HubApi().endpoint
    online = not offline and reachable(endpoint)
    reason = f"{MODELSCOPE_OFFLINE} is set" if offline else f"ModelScope ({endpoint}) cannot be reached"
    try:
        folder = Path(
            snapshot_download(
                hub_id.repo_id,
                revision=hub_id.revision,
                local_files_only=not online,
                ignore_patterns=OTHER_WEIGHTS if weights else WEIGHTS,
            )
        )
    except CacheNotFound:
        variables = (
            f"unset {MODELSCOPE_OFFLINE} to download it"
            if offline
            else "set MODELSCOPE_ENDPOINT to a mirror that answers"
        )
        raise _not_cached(
            hub_id, reason, _modelscope_cache(), variables, f"modelscope download {_download_args(hub_id)}"
        ) from None
    except HTTPError as error:
        raise HubUnreachableError(
            f"{hub_id}: ModelScope ({endpoint}) has no such model or refuses it ({_first_line(error)}): "
            "check the id, or log in (modelscope login, or set MODELSCOPE_API_TOKEN)"
        ) from None
    except (HubError, RequestException, OSError) as error:
        raise HubUnreachableError(
            f"{hub_id}: the download from ModelScope ({endpoint}) failed ({_first_line(error)}); run again to resume it"
        ) from None
    # its cache names a snapshot after the revision asked for (snapshots/<revision>); an
    # older client's layout (models/<org>/<name>) records none
    revision = folder.name if folder.parent.name == "snapshots" else hub_id.revision
    return Resolved(str(folder), MODELSCOPE, hub_id.repo_id, revision, weights)


def _modelscope_cache() -> Path:
    """Where modelscope keeps models (``MODELSCOPE_CACHE``/models)."""
    try:
        from modelscope_hub.config import get_default_config
    except ImportError:  # a modelscope before the modelscope_hub client
        from modelscope.utils.file_utils import get_model_cache_root

        return Path(get_model_cache_root())
    return get_default_config().cache_dir / "models"
