"""Runs and where they came from: every run folder's ``manifest.json``, found under the runs folder.

A run's ``parent`` is the id of the run its model came from, so the manifests alone give
the lineage (base -> sft -> grpo -> export). Only manifests are read (a few KB each),
from the runs folder and one level below it (a recipe's stages live inside its run).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloop.aliases import current_runs
from modelloop.artifacts import MANIFEST, runs_root
from modelloop.errors import ModelloopError

#: The metric a run is summed up by, per stage, first found wins.
KEY_METRICS = ("accuracy", "exact", "train_loss", "eval_loss", "latency_s")


@dataclass(frozen=True)
class Run:
    id: str
    path: Path
    manifest: Mapping[str, Any]

    @property
    def stage(self) -> str:
        return str(self.manifest.get("stage", "?"))

    @property
    def parent(self) -> str | None:
        return self.manifest.get("parent")

    @property
    def data_from(self) -> list[str]:
        """The runs whose served answers its data was made of (``data from-logs``)."""
        origins = ((self.manifest.get("data") or {}).get("origins") or {}).values()
        return sorted({run for origin in origins for run in origin.get("runs", [])})

    def key_metric(self) -> str:
        metrics = self.manifest.get("metrics") or {}
        for name in KEY_METRICS:
            if isinstance(metrics.get(name), (int, float)):
                return f"{name} {metrics[name]:.4g}"
        return ""

    def benchmark_scores(self) -> dict[str, float]:
        """``{"BACKEND:TASK.METRIC": score}``: the benchmarks this run was evaluated on (or,
        for an eval run, the ones it ran)."""
        return {
            f"{task}.{metric}": value
            for task, entry in (self.manifest.get("benchmarks") or {}).items()
            for metric, value in (entry.get("metrics") or {}).items()
        }

    def benchmark_summary(self, most: int = 3) -> str:
        """Each benchmark's first score, short: ``gsm8k 0.42, mmlu 0.31``."""
        entries = [
            f"{task.split(':', 1)[-1]} {next(iter(entry['metrics'].values())):.3g}"
            for task, entry in (self.manifest.get("benchmarks") or {}).items()
            if entry.get("metrics")
        ]
        more = f" (+{len(entries) - most})" if len(entries) > most else ""
        return ", ".join(entries[:most]) + more


def find_runs(root: Path | None = None) -> list[Run]:
    """Every run under the runs folder, oldest first (ids start with their time)."""
    root = root or runs_root()
    return sorted(_runs(root), key=lambda run: run.id)


def _runs(root: Path) -> Iterator[Run]:
    """The runs under ``root``, and the exports they wrote elsewhere (``exports`` in the
    run's manifest; such an export's id is its path, since only its name is its own)."""
    if not root.is_dir():
        return
    for manifest in [*root.glob(f"*/{MANIFEST}"), *root.glob(f"*/*/{MANIFEST}")]:
        data = _read(manifest)
        if data is None:
            continue
        yield Run(
            id=str(data.get("id") or manifest.parent.relative_to(root).as_posix()), path=manifest.parent, manifest=data
        )
        for export in map(Path, data.get("exports", [])):
            exported = _read(export / MANIFEST)
            if exported is not None and not export.resolve().is_relative_to(root.resolve()):
                yield Run(id=str(export), path=export, manifest=exported)


def _read(manifest: Path) -> dict[str, Any] | None:
    try:
        return json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None  # gone, or a run being written: its manifest appears atomically, so this is not one


def find_run(reference: str, runs: list[Run] | None = None) -> Run:
    """A run by id, by a unique end of its id, or by its folder."""
    path = Path(reference)
    if (path / MANIFEST).is_file():
        return Run(
            id=json.loads((path / MANIFEST).read_text()).get("id", path.name),
            path=path,
            manifest=json.loads((path / MANIFEST).read_text()),
        )
    runs = find_runs() if runs is None else runs
    exact = [run for run in runs if run.id == reference]
    matches = exact or [run for run in runs if run.id.endswith(reference)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ModelloopError(f"no run {reference!r} under {runs_root()} (see modelloop runs)")
    raise ModelloopError(f"{reference!r} matches {len(matches)} runs: {', '.join(run.id for run in matches[:5])}")


def tree_lines(runs: list[Run]) -> list[str]:
    """The lineage as indented lines: each run under the run its model came from."""
    ids = {run.id for run in runs}
    children: dict[str | None, list[Run]] = {}
    for run in runs:
        children.setdefault(run.parent if run.parent in ids else None, []).append(run)
    lines: list[str] = []

    current = current_runs()  # what the aliases point at (current:NAME)

    def line(run: Run, lead: str) -> str:
        base = f" (base {run.manifest['base_model']})" if not lead and run.manifest.get("base_model") else ""
        status = "" if run.manifest.get("status") in ("completed", None) else f" [{run.manifest['status']}]"
        status += " [held back]" if run.manifest.get("held_back") and "held back" not in status else ""
        status += "".join(f" [current:{name}]" for name in current.get(run.id, []))
        metric = run.key_metric()
        served = f" (data: answers of {', '.join(run.data_from)})" if run.data_from else ""
        return f"{lead}{run.id}  {run.stage}{base}{status}{served}{'  ' + metric if metric else ''}"

    def walk(parent: str, indent: str) -> None:
        below = children.get(parent, [])
        for position, run in enumerate(below):
            last = position == len(below) - 1
            lines.append(line(run, indent + ("└─ " if last else "├─ ")))
            walk(run.id, indent + ("   " if last else "│  "))

    for root in children.get(None, []):
        lines.append(line(root, ""))
        walk(root.id, "")
    return lines


def diff(first: Run, second: Run) -> list[tuple[str, Any, Any]]:
    """``(key, first's value, second's value)`` for every config key, metric and benchmark
    score that differs (``benchmark.lm-eval:gsm8k.exact_match``)."""
    rows = []
    for section in ("config", "metrics"):
        one, two = _flat(first.manifest.get(section) or {}), _flat(second.manifest.get(section) or {})
        rows += _differing(section, one, two)
    return rows + _differing("benchmark", first.benchmark_scores(), second.benchmark_scores())


def _differing(section: str, one: Mapping[str, Any], two: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    return [
        (f"{section}.{key}", one.get(key), two.get(key))
        for key in sorted(set(one) | set(two))
        if one.get(key) != two.get(key)
    ]


def _flat(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
