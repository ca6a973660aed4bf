"""Run folders and their ``manifest.json``: what every stage leaves behind.

A run folder holds a stage's outputs and a manifest saying what produced them: the
stage, the run it started from, the base model, the resolved config, the plugins and
their versions, the data files with their hashes, metrics, and the output files with
their hashes. A later stage can start from any run folder, which is how the loop closes.
Manifests are written atomically, so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

MANIFEST = "manifest.json"


def runs_root() -> Path:
    """``$MODELLOOP_HOME/runs`` if set, else ``./runs``."""
    home = os.environ.get("MODELLOOP_HOME")
    return Path(home) / "runs" if home else Path("runs")


def new_run_dir(stage: str, output_dir: Path | None = None) -> Path:
    """``output_dir`` exactly, or a new ``<runs>/<time>-<stage>`` folder."""
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        return output_dir
    root = runs_root()
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        candidate = root / (f"{stamp}-{stage}" if attempt == 0 else f"{stamp}-{stage}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {root}")


def run_id(run_dir: str | Path) -> str:
    """A run's id: its path under the runs folder (``<time>-sft``, or ``<recipe run>/02-sft``
    for a recipe's stage), else its folder name."""
    path = Path(run_dir).resolve()
    try:
        return path.relative_to(runs_root().resolve()).as_posix()
    except ValueError:
        return path.name


def is_run(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / MANIFEST).read_text())


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file written through a temporary beside ``path`` and renamed onto it when the block
    ends without an error: readers see the old file or the whole new one, never a part, and
    a process killed half-way leaves no partial file behind."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, mode) as out:
            yield out
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_json_atomic(path: Path, data: Any) -> None:
    with atomic_file(path) as out:
        json.dump(data, out, indent=2, default=str)
        out.write("\n")


def update_manifest(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the run's manifest (creating it) and write it atomically."""
    manifest = read_manifest(run_dir) if is_run(run_dir) else {}
    manifest.update(fields)
    write_json_atomic(run_dir / MANIFEST, manifest)
    return manifest


def sha256_path(path: Path) -> str:
    """The sha256 of a file, or of a folder's relative file names and contents."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def hashed_files(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256)."""
    return {str(path.relative_to(folder)): sha256_path(path) for path in sorted(folder.rglob("*")) if path.is_file()}


def environment(plugins: Mapping[str, str]) -> dict[str, Any]:
    from modelloop.version import __version__

    return {
        "host": platform.node(),
        "python": platform.python_version(),
        "modelloop": __version__,
        "plugins": dict(plugins),
    }
