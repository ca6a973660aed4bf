"""`modelloop runs` over thousands of runs: listing reads only manifests.

Writes N fake run folders (manifests shaped like real ones, a third of them inside recipe
runs), then times `find_runs` in-process and the `modelloop runs` and `modelloop runs tree`
commands end to end (process start included).

Usage: .venv/bin/python bench/runs_listing.py [--runs 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_runs(root: Path, count: int) -> None:
    for number in range(count):
        recipe = number % 3 == 0
        folder = (
            root / f"20260101-{number // 3:06d}-recipe-demo" / f"{number % 9:02d}-sft"
            if recipe
            else root / f"20260101-{number:06d}-sft"
        )
        folder.mkdir(parents=True, exist_ok=True)
        run_id = folder.relative_to(root).as_posix()
        manifest = {
            "id": run_id, "stage": "sft", "status": "completed", "parent": None, "base_model": "/models/tiny",
            "config": {"model": "/models/tiny", "lr": 1e-3, "max_steps": 100, "tuner": "lora", "tuner_options": {"rank": 8}},
            "metrics": {"train_loss": 1.0 + number / count, "train_runtime": 12.5}, "files": {f"model/file{i}": "0" * 64 for i in range(6)},
            "plugins": {f"modelloop-plugin-{i}": "0.1.0" for i in range(8)}, "host": "bench", "started": "2026-01-01T00:00:00",
        }  # fmt: skip
        (folder / "manifest.json").write_text(json.dumps(manifest))


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5000)
    arguments = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="runs-bench-"))
    write_runs(home / "runs", arguments.runs)
    os.environ["MODELLOOP_HOME"] = str(home)
    from modelloop.lineage import find_runs, tree_lines

    started = time.perf_counter()
    runs = find_runs()
    found = time.perf_counter() - started
    started = time.perf_counter()
    tree_lines(runs)
    tree = time.perf_counter() - started
    env = {**os.environ, "MODELLOOP_HOME": str(home)}
    modelloop = [sys.executable, "-m", "modelloop"]
    listing = min(timed([*modelloop, "runs"], env) for _ in range(3))
    tree_command = min(timed([*modelloop, "runs", "tree"], env) for _ in range(3))
    startup = min(timed([*modelloop, "--help"], env) for _ in range(3))
    print(f"{len(runs)} runs: find_runs {found * 1000:.0f} ms, tree_lines {tree * 1000:.0f} ms (in process)")
    print(
        f"modelloop runs {listing:.2f} s, modelloop runs tree {tree_command:.2f} s, modelloop --help {startup:.2f} s (process start included)"
    )


if __name__ == "__main__":
    main()
