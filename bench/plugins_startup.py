"""Wall time of `modelloop plugins` and `modelloop --help` against a bare interpreter.

Runs each command REPEAT times in fresh processes, with every plugin of this repository
loaded, and prints min / median seconds. The target (issue 2) is under 0.5 s wall for
`modelloop plugins`. Run with: .venv/bin/python bench/plugins_startup.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPEAT = 20
BIN = Path(sys.executable).parent


def timed(command: list[str]) -> list[float]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MODELLOOP_")}
    seconds = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    commands = {
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
        "modelloop --help": [str(BIN / "modelloop"), "--help"],
        "modelloop plugins": [str(BIN / "modelloop"), "plugins"],
        "modelloop plugins --all --json": [str(BIN / "modelloop"), "plugins", "--all", "--json"],
    }
    print(f"{'command':34} {'min s':>7} {'median s':>9}   ({REPEAT} runs each)")
    for label, command in commands.items():
        seconds = timed(command)
        print(f"{label:34} {min(seconds):7.3f} {statistics.median(seconds):9.3f}")


if __name__ == "__main__":
    main()
