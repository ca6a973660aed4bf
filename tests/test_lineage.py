"""The lineage tree: each run drawn under the run its model came from."""

from __future__ import annotations

from pathlib import Path

from modelloop.lineage import Run, tree_lines


def run(id: str, parent: str | None = None, **manifest) -> Run:
    return Run(id=id, path=Path(id), manifest={"id": id, "stage": "sft", "parent": parent, "status": "completed", **manifest})


def test_siblings_branch_and_the_last_one_closes():
    runs = [run("base", stage="new-model"), run("a", "base"), run("a1", "a"), run("b", "base"), run("b1", "b", status="failed"), run("other")]
    assert [line.rsplit("  ", 1)[0] for line in tree_lines(runs)] == [
        "base",
        "├─ a",
        "│  └─ a1",
        "└─ b",
        "   └─ b1",
        "other",
    ]
    assert tree_lines(runs)[4].endswith("sft [failed]")
