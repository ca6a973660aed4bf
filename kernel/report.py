"""A recipe run's report: a table of its stages on the terminal, ``report.md`` beside them.

``report.md`` holds the same table, the lineage of the runs the recipe made, and the
loss and reward plots of its training stages, linked where they lie.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Metrics worth a column, in this order, when a stage reports them.
COLUMNS = {
    "accuracy": "accuracy",
    "train_loss": "train loss (mean)",
    "train_loss_last": "last loss",
    "reward": "reward (weighted sum, mean of last 5 logs)",
    "train_tokens_per_second": "tokens/s",
    "latency_s": "latency s",
}


def stage_rows(recipe: Any, done: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for step in recipe.steps:
        state = done.get(step.name, {})
        metrics = state.get("metrics") or {}
        cells = [_number(metrics.get(key)) for key in COLUMNS]
        benchmarks = _benchmarks(metrics)
        rows.append([step.name, step.kind, *cells, benchmarks, _number(state.get("seconds")), state.get("run", "")])
    return rows


def _gate_lines(recipe: Any, done: Mapping[str, Any]) -> list[str]:
    """Each judged gate: its stage, the condition, the values compared, whether it held."""
    lines = []
    for step in recipe.steps:
        for verdict in done.get(step.name, {}).get("gates", []):
            state = "holds" if verdict["passed"] else "FAILS: the model is held back"
            metric = verdict.get("metric", "")
            which = f"{metric} " if metric and not verdict["gate"].startswith(metric) else ""
            lines.append(
                f"{step.name}: {verdict['gate']} ({which}{verdict['value']:.4g} against {verdict['bound']:.4g}) {state}"
            )
    return lines


def _benchmarks(metrics: Mapping[str, Any], most: int = 2) -> str:
    """A benchmark eval's scores (``TASK.METRIC``), the first few: ``gsm8k.exact_match 0.42``."""
    scores = [f"{name} {_number(value)}" for name, value in metrics.items() if "." in name]
    return ", ".join(scores[:most]) + (f" (+{len(scores) - most})" if len(scores) > most else "")


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def write_report(run_dir: Path, recipe: Any, done: Mapping[str, Any]) -> Path:
    """Print the stage table and write ``report.md``; returns its path."""
    from rich.console import Console
    from rich.table import Table

    from modelloop.lineage import find_runs, tree_lines

    header = ["stage", "kind", *COLUMNS.values(), "benchmarks", "seconds", "run"]
    rows = stage_rows(recipe, done)
    table = Table(*header[:-1], title=f"recipe {recipe.name}", box=None, pad_edge=False)
    for row in rows:
        table.add_row(*row[:-1])
    Console(width=max(Console().width, 100)).print(table)
    gates = _gate_lines(recipe, done)
    for line in gates:
        print(f"modelloop: gate: {line}")

    lines = [f"# Recipe `{recipe.name}`", "", f"Run folder: `{run_dir}`", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if gates:
        lines += ["", "## Gates", "", *(f"- {line}" for line in gates)]
    lines += ["", "## Lineage", "", "```"]
    runs = [
        run
        for run in find_runs(run_dir.parent)
        if run.path.resolve().is_relative_to(run_dir.resolve()) and run.path != run_dir
    ]
    lines += tree_lines(runs) or ["(no runs)"]
    lines += ["```", "", "## Plots", ""]
    for step in recipe.steps:
        step_dir = run_dir / step.folder
        for plot in ("loss.png", "rewards.png"):
            if (step_dir / plot).exists():
                lines += [
                    f"### {step.name}: {plot[:-4]}",
                    "",
                    f"![{step.name} {plot[:-4]}]({step_dir.name}/{plot})",
                    "",
                ]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    print(f"modelloop: report: {report}")
    return report
