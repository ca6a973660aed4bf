"""Hub ids on both hubs, with no network: caches built in each hub's own on-disk layout,
read through each library's own lookup (huggingface_hub's and modelscope's snapshot_download)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

import modelloop
from modelloop.errors import MissingLibraryError, ModelLoadError
from modelloop.models import hub
from modelloop.models.hub import HubId
from modelloop.models.loading import load_tokenizer, read_config, resolve_model_source
from modelloop.parallel.world import free_port

MAIN, OLD = "a" * 40, "b" * 40  # two commits of acme/tiny on the Hugging Face Hub


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection beyond this machine is refused and fails the test (a closed local port
    is how the tests make a hub unreachable)."""
    connect, attempts = socket.socket.connect, []

    def local_only(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost", "::1"):
            attempts.append(address)
            raise ConnectionRefusedError(f"a test tried to reach {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    monkeypatch.setenv(hub.RESOLVED, "{}")  # what this test resolves is forgotten after it
    yield
    assert not attempts, f"the test tried to reach {attempts}"


def hf_snapshot(repo: Path, commit: str, model: Path) -> None:
    """``model``'s files as huggingface_hub stores a snapshot: content in blobs/ (named by
    hash), snapshots/<commit>/ holding relative links to them."""
    for file in model.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = repo / "snapshots" / commit / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture
def hf_cache(tmp_path, tiny_models, monkeypatch):
    """A Hugging Face cache holding acme/tiny: main at MAIN, tag v1 at OLD."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--acme--tiny"
    for commit in (MAIN, OLD):
        hf_snapshot(repo, commit, tiny_models("qwen2"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(OLD)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read when huggingface_hub is imported
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def modelscope_cache(tmp_path, tiny_models, monkeypatch):
    """A ModelScope cache holding acme/tiny at master and v1.0, as modelscope 1.38+ writes
    it (``{MODELSCOPE_CACHE}/models/{org}--{name}/snapshots/{revision}/``)."""
    pytest.importorskip("modelscope")
    from modelscope_hub.config import set_default_config

    cache = tmp_path / "modelscope"
    for revision in ("master", "v1.0"):
        shutil.copytree(tiny_models("qwen2"), cache / "models" / "acme--tiny" / "snapshots" / revision)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "modelscope-home"))  # its credentials folder
    set_default_config(None)  # modelscope reads its settings once a process: again, from these
    yield cache
    set_default_config(None)


def test_the_forms_of_a_hub_id():
    assert HubId.parse("acme/tiny") == HubId("huggingface", "acme/tiny")
    assert HubId.parse("acme/tiny@v1") == HubId("huggingface", "acme/tiny", "v1")
    assert HubId.parse("hf://acme/tiny@refs/pr/1") == HubId("huggingface", "acme/tiny", "refs/pr/1", explicit=True)
    assert HubId.parse("modelscope://acme/Tiny-0.5B@v1.0") == HubId("modelscope", "acme/Tiny-0.5B", "v1.0", True)
    assert str(HubId.parse("modelscope://acme/tiny@v1.0")) == "modelscope://acme/tiny@v1.0"
    for text in ("./acme/tiny", "acme/tiny/model", "tiny", "acme/tiny@", "modelscope://tiny"):
        assert HubId.parse(text) is None, text


def test_a_cached_hub_id_trains_offline_and_its_commit_goes_into_the_manifest(hf_cache, tmp_path):
    data = tmp_path / "chats.jsonl"
    chat = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    data.write_text(json.dumps(chat) + "\n")
    modelloop.sft(
        {
            "model": "acme/tiny",
            "data": [str(data)],
            "max_steps": 1,
            "max_length": 32,
            "output_dir": str(tmp_path / "run"),
        }
    )
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["config"]["model"] == "acme/tiny"
    assert manifest["base_model"] == str(hf_cache / "models--acme--tiny" / "snapshots" / MAIN)
    assert manifest["base_model_hub"] == {"hub": "huggingface", "id": "acme/tiny", "revision": MAIN}
    # the processes a run starts read the folder it resolved, without asking the hub again
    assert json.loads(os.environ[hub.RESOLVED])["acme/tiny"]["folder"] == manifest["base_model"]
    # the adapter run moved to a machine without that folder: its base comes from the hub, pinned
    manifest["base_model"] = str(tmp_path / "elsewhere")
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    moved = resolve_model_source(tmp_path / "run")
    assert (moved.adapter, moved.base) == (
        str(tmp_path / "run" / "model"),
        str(hf_cache / "models--acme--tiny" / "snapshots" / MAIN),
    )


def test_a_revision_pins_the_snapshot(hf_cache, modelscope_cache):
    snapshots = hf_cache / "models--acme--tiny" / "snapshots"
    for text in (f"acme/tiny@{OLD}", "acme/tiny@v1", "hf://acme/tiny@v1"):
        source = resolve_model_source(text)
        assert (source.base, source.hub["revision"]) == (str(snapshots / OLD), OLD), text
    assert resolve_model_source("acme/tiny").hub["revision"] == MAIN
    with pytest.raises(ModelLoadError, match=r"^acme/tiny@v2: HF_HUB_OFFLINE is set and the model is not in"):
        resolve_model_source("acme/tiny@v2")
    pinned = resolve_model_source("modelscope://acme/tiny@v1.0")
    assert pinned.base == str(modelscope_cache / "models" / "acme--tiny" / "snapshots" / "v1.0")
    assert pinned.hub == {"hub": "modelscope", "id": "acme/tiny", "revision": "v1.0"}


def test_a_modelscope_id_resolves_from_its_cache_offline(modelscope_cache, monkeypatch):
    """Through modelscope's own lookup: with MODELSCOPE_OFFLINE set, and with ModelScope out
    of reach (its endpoint a closed port), the cached default branch is read."""
    folder = modelscope_cache / "models" / "acme--tiny" / "snapshots" / "master"
    source = resolve_model_source("modelscope://acme/tiny")
    assert (source.base, source.hub) == (str(folder), {"hub": "modelscope", "id": "acme/tiny", "revision": "master"})
    assert read_config("modelscope://acme/tiny").model_type == "qwen2"
    assert load_tokenizer("modelscope://acme/tiny").pad_token is not None

    monkeypatch.delenv(hub.RESOLVED)
    monkeypatch.delenv(hub.MODELSCOPE_OFFLINE)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    from modelscope_hub.config import set_default_config

    set_default_config(None)
    assert resolve_model_source("modelscope://acme/tiny").base == str(folder)


@pytest.mark.parametrize("which", ["hf offline", "hf unreachable", "modelscope offline", "modelscope unreachable"])
def test_a_missing_model_without_network_fails_in_one_line(which, hf_cache, modelscope_cache, monkeypatch):
    """The line names the id, the cache searched and the variables that change either."""
    from huggingface_hub import constants
    from modelscope_hub.config import set_default_config

    endpoint = f"http://127.0.0.1:{free_port()}"
    if which == "hf unreachable":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.delenv("HF_HUB_OFFLINE")  # what the hub falling back to its cache sets
    if which == "modelscope unreachable":
        monkeypatch.delenv(hub.MODELSCOPE_OFFLINE)
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", endpoint)
        set_default_config(None)
    expected = {
        "hf offline": (
            f"acme/other: HF_HUB_OFFLINE is set and the model is not in the hub cache ({hf_cache}); "
            "set HF_HUB_OFFLINE=0 to download it, set HF_HUB_CACHE to a cache that holds it "
            "(hf download acme/other where there is a network), or give a model folder instead of the id"
        ),
        "hf unreachable": (
            f"acme/other: the hub ({endpoint}) cannot be reached and the model is not in the hub cache ({hf_cache}); "
            "set HF_ENDPOINT to a mirror that answers, set HF_HUB_CACHE to a cache that holds it "
            "(hf download acme/other where there is a network), or give a model folder instead of the id"
        ),
        "modelscope offline": (
            "modelscope://acme/other: MODELSCOPE_OFFLINE is set and the model is not in the ModelScope cache "
            f"({modelscope_cache / 'models'}); unset MODELSCOPE_OFFLINE to download it, set MODELSCOPE_CACHE to a "
            "cache that holds it (modelscope download acme/other where there is a network), or give a model folder "
            "instead of the id"
        ),
        "modelscope unreachable": (
            f"modelscope://acme/other: ModelScope ({endpoint}) cannot be reached and the model is not in the "
            f"ModelScope cache ({modelscope_cache / 'models'}); set MODELSCOPE_ENDPOINT to a mirror that answers, "
            "set MODELSCOPE_CACHE to a cache that holds it (modelscope download acme/other where there is a "
            "network), or give a model folder instead of the id"
        ),
    }[which]
    with pytest.raises(ModelLoadError) as raised:
        read_config(("modelscope://" if which.startswith("modelscope") else "") + "acme/other")
    assert str(raised.value) == expected


def test_a_modelscope_id_without_the_modelscope_package_is_one_line(monkeypatch):
    find_spec = hub.importlib.util.find_spec
    monkeypatch.setattr(
        hub.importlib.util, "find_spec", lambda name, *args: None if name == "modelscope" else find_spec(name, *args)
    )
    with pytest.raises(MissingLibraryError) as raised:
        resolve_model_source("modelscope://acme/tiny")
    assert str(raised.value) == (
        "modelscope://acme/tiny: ModelScope ids need the modelscope package: pip install 'modelloop[modelscope]'"
    )
