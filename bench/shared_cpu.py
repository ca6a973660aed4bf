"""SFT on a CPU shared with other work: the speed alone and beside CPU-bound processes.

Runs the README's SFT line (the tiny Qwen3 built on the shipped sums, full tuning, batch
16, max length 64) for --steps steps, alone and then beside --competitors processes that
each keep one CPU busy (``while True: pass``), twice each:

  modelloop        the command as it runs (``modelloop.threads``: the pool capped at the
                   available CPUs, idle OpenMP threads spinning 3,000 rounds before sleeping)
  libgomp default  the same with GOMP_SPINCOUNT=300000, libgomp's own default spin

Prints train tokens/s of each run (from the run's manifest) and each beside-figure as a
share of the best alone-figure of the same variant and of modelloop's. Target (issue 24):
at least 40 % with one competing process on 2 cores.

Usage: .venv/bin/python bench/shared_cpu.py [--steps 60] [--competitors 1] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELLOOP = [sys.executable, "-m", "modelloop"]
DATA = REPO / "examples" / "data" / "sums.jsonl"
VARIANTS = {"modelloop": {}, "libgomp default": {"GOMP_SPINCOUNT": "300000"}}


def sft(model: Path, out: Path, steps: int, env: dict[str, str]) -> float:
    """One SFT run; its training tokens/s."""
    command = [
        *MODELLOOP,
        "sft",
        "--model",
        str(model),
        "--data",
        str(DATA),
        "--tuner",
        "full",
        "--lr",
        "1e-3",
        "--batch-size",
        "16",
    ]
    command += ["--max-length", "64", "--max-steps", str(steps), "--output-dir", str(out)]
    subprocess.run(command, env=env, check=True, capture_output=True)
    return json.loads((out / "manifest.json").read_text())["metrics"]["train_tokens_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--competitors", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    arguments = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shared-cpu-"))
    base = {
        key: value
        for key, value in os.environ.items()
        if key not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    }
    base.update(HF_HUB_OFFLINE="1", MODELLOOP_HOME=str(work / "home"))
    model = work / "tiny-qwen3"
    subprocess.run(
        [*MODELLOOP, "new-model", "--family", "qwen3", "--corpus", str(DATA), "--out", str(model)],
        env=base,
        check=True,
        capture_output=True,
    )
    figures: dict[tuple[str, bool], list[float]] = {}
    runs = 0
    for _ in range(arguments.repeat):
        for name, extra in VARIANTS.items():
            for beside in (False, True):
                busy = [
                    subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(arguments.competitors if beside else 0)
                ]
                try:
                    runs += 1
                    figures.setdefault((name, beside), []).append(
                        sft(model, work / f"run-{runs}", arguments.steps, {**base, **extra})
                    )
                finally:
                    for process in busy:
                        process.kill()
                        process.wait()
    best_alone = {name: max(figures[name, False]) for name in VARIANTS}
    print(
        f"train tokens/s, {arguments.steps} steps, {os.cpu_count()} CPUs, {arguments.competitors} competing process(es), {arguments.repeat} runs each"
    )
    print(f"{'':18}{'alone':>16}{'beside':>16}{'beside / alone':>16}{'/ modelloop alone':>19}")
    for name in VARIANTS:
        alone, beside = figures[name, False], figures[name, True]
        line = f"{name:18}{' '.join(f'{x:.0f}' for x in alone):>16}{' '.join(f'{x:.0f}' for x in beside):>16}"
        line += f"{statistics.mean(beside) / best_alone[name]:>15.0%} {statistics.mean(beside) / best_alone['modelloop']:>18.0%}"
        print(line)


if __name__ == "__main__":
    main()
