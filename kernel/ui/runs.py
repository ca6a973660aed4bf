"""What the runs pages show, read from the run folders as ``modelloop runs`` reads them:
one row per run, a run's metrics as series, its files, and the lineage as a graph."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloop.lineage import Run

#: The plots of a run page: a title, and the metrics it draws (the first ones a run logged).
PLOTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "eval_loss")),
    ("reward", ("reward", "objective/scores", "rewards/margins", "rewards/accuracies")),
    ("tokens/s", ("tokens_per_second",)),
    ("learning rate", ("learning_rate",)),
)


def status(run: Run) -> str:
    """running, completed, failed, or stopped (interrupted by the user: resumable)."""
    state = str(run.manifest.get("status", "?"))
    if state == "failed" and str(run.manifest.get("error", "")).startswith("KeyboardInterrupt"):
        return "stopped"
    return state


def row(run: Run) -> dict[str, Any]:
    """A run's line in the runs list."""
    manifest = run.manifest
    data = manifest.get("data") or {}
    return {
        "id": run.id,
        "stage": run.stage,
        "status": status(run),
        "base": Path(str(manifest.get("base_model") or "")).name,
        "parent": run.parent or "",
        "data": ", ".join(Path(file).name for file in data.get("train") or []),
        "metric": run.key_metric(),
        "started": str(manifest.get("started", "")).replace("T", " "),
        "finished": str(manifest.get("finished", "")).replace("T", " "),
    }


def matches(line: Mapping[str, Any], *, stage: str = "", state: str = "", text: str = "") -> bool:
    """The runs list's filters: a stage, a status, and text anywhere in the row."""
    return (
        (not stage or line["stage"] == stage)
        and (not state or line["status"] == state)
        and (not text or text.lower() in " ".join(map(str, line.values())).lower())
    )


def metrics(run: Run, after: int = 0) -> list[dict[str, Any]]:
    """The run's logged metrics (``metrics.jsonl``) from line ``after`` on; a line being
    written is left for the next read."""
    path = run.path / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines()[after:]:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def files(run: Run) -> list[dict[str, Any]]:
    """The run folder's top level: files with their sizes, folders with the size inside."""
    listed = []
    for path in sorted(run.path.iterdir()):
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        listed.append({"name": path.name + ("/" if path.is_dir() else ""), "size": size, "file": path.is_file()})
    return listed


def steps(run: Run) -> list[dict[str, Any]]:
    """A recipe run's stages so far, in order: name, the stage's run, status, seconds and
    its gates' verdicts (``manifest["steps"]``, written as each stage starts and ends)."""
    return [
        {
            "name": name,
            "run": step.get("run", ""),
            "status": step.get("status", ""),
            "seconds": step.get("seconds"),
            "gates": [
                f"{gate.get('metric')} {'passed' if gate.get('passed') else 'failed'}" for gate in step.get("gates", [])
            ],
        }
        for name, step in (run.manifest.get("steps") or {}).items()
    ]


def config_rows(run: Run) -> list[tuple[str, str]]:
    """The config the run was started with, one key a row (values as JSON)."""
    return [(key, json.dumps(value)) for key, value in sorted((run.manifest.get("config") or {}).items())]


@dataclass(frozen=True)
class Node:
    """A box of the lineage graph: a run, or a base model no run made."""

    id: str
    label: str
    detail: str
    x: int
    y: int
    run: bool


WIDTH, HEIGHT, GAP_X, GAP_Y = 220, 46, 60, 18


def lineage(runs: Iterable[Run], focus: str | None = None) -> dict[str, Any]:
    """The lineage as a graph laid out left to right: base models, then each run after the
    run (or model) it started from. With ``focus``, only that run's ancestors and
    descendants. Returns nodes, edges and the drawing's size."""
    runs = list(runs)
    by_id = {run.id: run for run in runs}

    def origin(run: Run) -> str:
        return run.parent if run.parent in by_id else f"model:{run.manifest.get('base_model') or '?'}"

    children: dict[str, list[str]] = {}
    for run in runs:
        children.setdefault(origin(run), []).append(run.id)
    if focus is not None and focus in by_id:
        kept = {focus}
        walker = focus
        while walker in by_id:  # ancestors
            walker = origin(by_id[walker])
            kept.add(walker)
        stack = [focus]
        while stack:  # descendants
            below = children.get(stack.pop(), [])
            kept.update(below)
            stack.extend(below)
        children = {parent: [c for c in kids if c in kept] for parent, kids in children.items() if parent in kept}
    roots = sorted(parent for parent in children if parent.startswith("model:"))
    nodes: list[Node] = []
    edges: list[tuple[str, str]] = []
    row_number = 0

    def place(node_id: str, depth: int) -> None:
        nonlocal row_number
        run = by_id.get(node_id)
        if run is None:
            label, detail = Path(node_id.removeprefix("model:")).name or node_id, "base model"
        else:
            metric = run.key_metric()
            label, detail = node_id, f"{run.stage} · {status(run)}" + (f" · {metric}" if metric else "")
        x, y = depth * (WIDTH + GAP_X), row_number * (HEIGHT + GAP_Y)
        nodes.append(Node(node_id, label, detail, x, y, run is not None))
        row_number += 1
        for child in sorted(children.get(node_id, [])):
            edges.append((node_id, child))
            place(child, depth + 1)

    for root in roots:
        place(root, 0)
    width = max((node.x for node in nodes), default=0) + WIDTH
    height = max((node.y for node in nodes), default=0) + HEIGHT
    return {"nodes": nodes, "edges": edges, "width": width, "height": height, "box": (WIDTH, HEIGHT)}
