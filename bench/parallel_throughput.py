"""Two processes against one on the CPU: ddp, fsdp, DeepSpeed ZeRO-2 and ZeRO-3, with the
memory planner's estimate beside each measured peak.

Every run is the same ``modelloop pt`` of qwen2's ``small`` preset (24 M parameters, full
tuning) on long text rows: one process with 4 rows of 256 tokens a step, then two
processes with 2 rows each (the same global batch) under each strategy. Throughput is the
stage's own ``train_tokens_per_second`` (tokens of every rank); peak memory is rank 0's
(``peak_memory_mib``: resident memory above what the process held before the model
loaded). The estimate is ``modelloop plan``'s total for the same settings.

On this 2-core machine two processes share the cores one process uses alone, so the
throughput ratio shows each strategy's overhead, not a speed-up.

Usage: .venv/bin/python bench/parallel_throughput.py [--steps 10] [--strategies ddp,fsdp,zero2,zero3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

#: name in the table -> the flags that choose it.
STRATEGIES = {
    "ddp": ["--strategy", "ddp"],
    "fsdp": ["--strategy", "fsdp"],
    "zero2": ["--strategy", "deepspeed", "--set", "strategy_options.stage=2"],
    "zero3": ["--strategy", "deepspeed", "--set", "strategy_options.stage=3"],
}
GLOBAL_BATCH = 4
LENGTH = 256


def write_texts(path: Path) -> Path:
    generator = random.Random(0)
    words = "the a of to and in is it that for on with as was at by an be this from".split()
    rows = [
        {"text": " ".join(f"{generator.choice(words)}{generator.randint(0, 99)}" for _ in range(400))}
        for _ in range(256)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train(model: Path, data: Path, out: Path, steps: int, nproc: int, flags: list[str]) -> dict:
    argv = [
        sys.executable,
        "-m",
        "modelloop",
        "pt",
        "--model",
        str(model),
        "--data",
        str(data),
        "--tuner",
        "full",
        "--max-steps",
        str(steps),
    ]
    argv += [
        "--batch-size",
        str(GLOBAL_BATCH // nproc),
        "--max-length",
        str(LENGTH),
        "--nproc",
        str(nproc),
        "--output-dir",
        str(out),
        *flags,
    ]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "manifest.json").read_text())["metrics"]


def estimate_mib(model: Path, data: Path, steps: int, nproc: int, flags: list[str]) -> float:
    from modelloop.config import TrainConfig, build_config
    from modelloop.parallel.memory import MIB
    from modelloop.parallel.planner import plan_memory

    settings = {
        "model": str(model),
        "data": [str(data)],
        "tuner": "full",
        "batch_size": GLOBAL_BATCH // nproc,
        "max_length": LENGTH,
        "max_steps": steps,
        "nproc": nproc,
    }
    if flags:
        settings["strategy"] = flags[1]
    if "--set" in flags:
        settings["strategy_options"] = {"stage": int(flags[-1].rsplit("=", 1)[1])}
    return plan_memory(build_config(TrainConfig, settings), cuda=False).estimate.total / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from modelloop.models.new_model import new_model

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = new_model("qwen2", "small", root / "small")
        data = write_texts(root / "texts.jsonl")
        rows = []
        runs = [("1 process", 1, [])] + [(name, 2, STRATEGIES[name]) for name in args.strategies.split(",")]
        baseline = None
        for name, nproc, flags in runs:
            metrics = train(model, data, root / name.replace(" ", "-"), args.steps, nproc, flags)
            speed = metrics["train_tokens_per_second"]
            baseline = baseline or speed
            estimated = estimate_mib(model, data, args.steps, nproc, flags)
            measured = metrics["peak_memory_mib"]
            rows.append((name, nproc, speed, speed / baseline, measured, estimated, estimated / measured))
            print(f"{name}: {speed:,.0f} tokens/s, peak {measured:,.0f} MiB, estimate {estimated:,.0f} MiB", flush=True)
    print()
    print("| strategy | processes | tokens/s | vs 1 process | peak MiB / process | estimate MiB | estimate / peak |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, nproc, speed, ratio, measured, estimated, share in rows:
        print(f"| {name} | {nproc} | {speed:,.0f} | {ratio:.2f}x | {measured:,.0f} | {estimated:,.0f} | {share:.2f} |")


if __name__ == "__main__":
    main()
