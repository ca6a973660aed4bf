"""The lineage tree: each run drawn under the run its model came from."""

from __future__ import annotations

import json
from pathlib import Path

from modelloop.lineage import Run, find_runs, tree_lines


def run(id: str, parent: str | None = None, **manifest) -> Run:
    return Run(
        id=id, path=Path(id), manifest={"id": id, "stage": "sft", "parent": parent, "status": "completed", **manifest}
    )


def test_siblings_branch_and_the_last_one_closes():
    runs = [
        run("base", stage="new-model"),
        run("a", "base"),
        run("a1", "a"),
        run("b", "base"),
        run("b1", "b", status="failed"),
        run("other"),
    ]
    assert [line.rsplit("  ", 1)[0] for line in tree_lines(runs)] == [
        "base",
        "├─ a",
        "│  └─ a1",
        "└─ b",
        "   └─ b1",
        "other",
    ]
    assert tree_lines(runs)[4].endswith("sft [failed]")


def test_an_export_written_outside_the_runs_folder_is_drawn_under_its_run(tmp_path):
    """`export RUN --out exports/merged` records the folder in RUN's manifest; the tree finds it there."""
    root, export = tmp_path / "runs", tmp_path / "exports" / "merged"
    for folder, manifest in (
        (root / "1-sft", {"id": "1-sft", "stage": "sft", "exports": [str(export), str(tmp_path / "deleted")]}),
        (export, {"id": "merged", "stage": "export", "parent": "1-sft"}),
    ):
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"status": "completed", **manifest}))
    runs = find_runs(root)
    assert {(run.id, run.parent) for run in runs} == {("1-sft", None), (str(export), "1-sft")}
    assert [line.split("  ")[0] for line in tree_lines(runs)] == ["1-sft", f"└─ {export}"]
