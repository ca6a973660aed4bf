"""Which run is the one to serve: ``current:NAME`` aliases, set by a recipe's ``promote`` stage.

The aliases live in ``<runs folder>/aliases.json``: for each name, the run it points at
now and the runs it pointed at before (newest last), each with when and by which recipe
run. ``modelloop serve current:NAME`` serves the run the alias points at, and
``modelloop runs tree`` marks it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from modelloop.artifacts import read_manifest, runs_root, write_json_atomic
from modelloop.errors import ModelloopError

PREFIX = "current:"
FILE = "aliases.json"


def read_aliases(root: Path | None = None) -> dict[str, Any]:
    path = (root or runs_root()) / FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def promote(name: str, run_dir: Path, *, by: str | None = None, root: Path | None = None) -> dict[str, Any]:
    """Point ``current:NAME`` at ``run_dir``; a run held back by a gate is refused."""
    held = read_manifest(run_dir).get("held_back")
    if held:
        raise ModelloopError(f"{run_dir}: held back by a gate ({held.get('reason', 'a gate failed')}): not promoted")
    root = root or runs_root()
    aliases = read_aliases(root)
    entry = {"run": str(read_manifest(run_dir).get("id", run_dir.name)), "path": str(run_dir.resolve())}
    entry.update(promoted=time.strftime("%Y-%m-%dT%H:%M:%S"), by=by)
    previous = aliases.get(name)
    history = [*previous.get("history", []), {k: v for k, v in previous.items() if k != "history"}] if previous else []
    aliases[name] = {**entry, "history": history}
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / FILE, aliases)
    return aliases[name]


def resolve_alias(reference: str) -> str:
    """``current:NAME`` as the folder of the run it points at; anything else as given."""
    if not reference.startswith(PREFIX):
        return reference
    name = reference[len(PREFIX) :]
    aliases = read_aliases()
    if name not in aliases:
        known = ", ".join(sorted(aliases)) or "none yet (a recipe's promote stage sets one)"
        raise ModelloopError(f"{reference}: no such alias in {runs_root() / FILE} (aliases: {known})")
    return aliases[name]["path"]


def current_runs(root: Path | None = None) -> dict[str, list[str]]:
    """Each run id an alias points at now, with the aliases' names."""
    found: dict[str, list[str]] = {}
    for name, entry in read_aliases(root).items():
        found.setdefault(entry["run"], []).append(name)
    return found
