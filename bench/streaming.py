"""Streaming ``pt`` (``streaming: true``) against the pre-tokenised path: memory and tokens/s.

Generates a JSONL corpus of N text records (default 1,000,000: sentences of 8-40 common
words) and its first 10,000 records, builds the tiny Qwen2 locally, then runs, each in a
process of its own (its peak RSS is its own):

  data only    the stream alone (read, validate, tokenise, pack, order) over one whole
               pass of each corpus, no model: examples/s and peak memory
  pt           ``modelloop.pt`` for --steps steps, full tuning, on each corpus streamed and
               on the big one pre-tokenised; tokens/s is the stage's own
               ``train_tokens_per_second`` (training tokens over the training seconds),
               so the pre-tokenised run's tokenising is not in it

The pt runs alternate streamed and pre-tokenised, --repeat times each (medians are
compared; the machine may be shared). The first pre-tokenised run tokenises the corpus
and caches it; the later ones load the cache. Prints a table and writes the figures as
JSON (--json).

Targets (issue 18): streaming pt over the 1,000,000 records peaks no more than 10 % above
the 10,000-record run, at tokens/s within 10 % of the pre-tokenised path on the same data.

Run: .venv/bin/python bench/streaming.py [--records 1000000] [--steps 120] [--repeat 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORDS = (
    "the of and to in is was for on that with as by at from his her an which it be are this had not but were "
    "they have one all their there been has when who will more no if out so said what up its about into than them "
    "can only other new some could time these two may then do first any my now such like our over man me even most "
    "made after also did many before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old year off come since against go came right"
).split()


def generate(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as out:
        for index in range(count):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))
            out.write(json.dumps({"text": f"{index}: {words.capitalize()}."}) + "\n")


def head(source: Path, target: Path, count: int) -> None:
    with source.open() as lines, target.open("w") as out:
        for _, line in zip(range(count), lines):
            out.write(line)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- children


def child_data(spec: dict) -> dict:
    """One whole pass of the stream over ``spec['data']``, no model."""
    import functools

    from modelloop.data.streaming import Stream
    from modelloop.data.tokenize import Encoder
    from modelloop.models.loading import load_tokenizer
    from modelloop.registry import SAMPLERS, get_registry
    from modelloop.training import arrange_items

    tokenizer = load_tokenizer(spec["model"])
    arrange = functools.partial(
        arrange_items,
        max_length=spec["max_length"],
        packing=True,
        sampler=get_registry(SAMPLERS).get("random"),
        batch_size=spec["batch_size"],
        options={},
    )
    rows = 0
    started = time.perf_counter()
    with Stream(
        [spec["data"]],
        Encoder(tokenizer, None),
        arrange,
        kind="text",
        max_length=spec["max_length"],
        buffer_size=spec["buffer"],
    ) as stream:
        for _, buffer, _ in stream.items():
            if buffer.start.epoch > 0:
                break
            rows += 1
            stats = buffer.stats
    seconds = time.perf_counter() - started
    return {
        "examples": stats.examples,
        "tokens": stats.tokens,
        "rows": rows,
        "seconds": seconds,
        "examples_per_s": stats.examples / seconds,
        "peak_rss_mib": peak_rss_mib(),
    }


def child_pt(spec: dict) -> dict:
    import modelloop

    started = time.perf_counter()
    result = modelloop.pt(spec["config"])
    metrics = result["metrics"]
    stats = json.loads((Path(result["run_dir"]) / "manifest.json").read_text())["data"]["stats"]
    return {
        "tokens_per_s": metrics["train_tokens_per_second"],
        "train_s": metrics.get("train_runtime"),
        "wall_s": time.perf_counter() - started,
        "loss": metrics.get("train_loss"),
        "examples_read": stats["examples"],
        "peak_rss_mib": peak_rss_mib(),
    }


def run_child(kind: str, spec: dict, env: dict) -> dict:
    command = [sys.executable, __file__, "--child", kind, json.dumps(spec)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{kind} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000, help="records of the small corpus")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--buffer", type=int, default=10_000, help="stream_buffer")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/modelloop-bench-streaming"))
    parser.add_argument("--json", type=Path, default=None, help="where the figures go (default: WORK/streaming.json)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        kind, spec = arguments.child
        print(json.dumps((child_data if kind == "data" else child_pt)(json.loads(spec))))
        return

    work = arguments.work
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MODELLOOP_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    big, small = work / f"corpus-{arguments.records}.jsonl", work / f"corpus-{arguments.small}.jsonl"
    if not big.exists():
        started = time.perf_counter()
        generate(big.with_suffix(".partial"), arguments.records)
        big.with_suffix(".partial").rename(big)
        print(f"generated {big} in {time.perf_counter() - started:.0f} s", flush=True)
    head(big, small, arguments.small)
    model = work / "tiny-qwen2"
    if not model.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "modelloop",
                "new-model",
                "--family",
                "qwen2",
                "--preset",
                "tiny",
                "--out",
                str(model),
            ],
            env=env,
            check=True,
            capture_output=True,
        )
    print(
        f"corpus {arguments.records:,} records ({big.stat().st_size / 2**20:,.0f} MiB) and {arguments.small:,}; "
        f"tiny qwen2, full tuning, {arguments.steps} steps of {arguments.batch_size} rows x {arguments.max_length}, "
        f"stream_buffer {arguments.buffer:,}",
        flush=True,
    )

    out = arguments.json or work / "streaming.json"
    data_spec = {"model": str(model), "max_length": arguments.max_length, "batch_size": arguments.batch_size}
    data_spec["buffer"] = arguments.buffer
    results: dict = {"settings": {key: str(value) for key, value in vars(arguments).items() if key != "child"}}
    results["data_only"] = {}
    for label, path in (("small", small), ("big", big)):
        figures = results["data_only"][label] = run_child("data", {**data_spec, "data": str(path)}, env)
        print(f"  data only, {label}: {json.dumps(figures)}", flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    def pt(label: str, path: Path, streaming: bool, attempt: int) -> dict:
        config = {
            "model": str(model),
            "data": [str(path)],
            "tuner": "full",
            "lr": 1e-3,
            "max_steps": arguments.steps,
            "batch_size": arguments.batch_size,
            "max_length": arguments.max_length,
            "logging_steps": 50,
            "streaming": streaming,
            "stream_buffer": arguments.buffer,
            "output_dir": str(work / "runs" / f"{label}-{attempt}-{time.time_ns()}"),
        }
        return run_child("pt", {"config": config}, env)

    runs: dict[str, list[dict]] = {"streamed big": [], "pre-tokenised big": [], "streamed small": []}
    results["pt"] = runs
    for attempt in range(arguments.repeat):
        for label, path, streaming in (
            ("pre-tokenised big", big, False),
            ("streamed big", big, True),
            ("streamed small", small, True),
        ):
            runs[label].append(pt(label.replace(" ", "-"), path, streaming, attempt))
            print(f"  pt, {label}: {json.dumps(runs[label][-1])}", flush=True)
            out.write_text(json.dumps(results, indent=2) + "\n")

    def median(label: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[label])

    print(f"\n{'data only (one pass, no model)':34} {'examples':>10} {'examples/s':>11} {'peak RSS MiB':>13}")
    for label, figures in results["data_only"].items():
        print(
            f"{label:34} {figures['examples']:>10,} {figures['examples_per_s']:>11,.0f} {figures['peak_rss_mib']:>13,.0f}"
        )
    print(f"\n{'pt':34} {'tokens/s (each run)':>24} {'median':>8} {'peak RSS MiB':>13} {'wall s':>7}")
    for label, attempts in runs.items():
        each = " ".join(f"{run['tokens_per_s']:,.0f}" for run in attempts)
        print(
            f"{label:34} {each:>24} {median(label, 'tokens_per_s'):>8,.0f} "
            f"{median(label, 'peak_rss_mib'):>13,.0f} {median(label, 'wall_s'):>7.0f}"
        )
    memory = median("streamed big", "peak_rss_mib") / median("streamed small", "peak_rss_mib")
    speed = median("streamed big", "tokens_per_s") / median("pre-tokenised big", "tokens_per_s")
    data_memory = results["data_only"]["big"]["peak_rss_mib"] / results["data_only"]["small"]["peak_rss_mib"]
    results["ratios"] = {
        "pt_peak_memory_big_over_small": memory,
        "data_only_peak_memory_big_over_small": data_memory,
        "streamed_over_pretokenised_tokens_per_s": speed,
    }
    print(
        f"\nstreamed pt, {arguments.records:,} over {arguments.small:,} records: peak memory {memory:.3f}x "
        f"(target <= 1.10; data only {data_memory:.3f}x)"
    )
    print(f"streamed over pre-tokenised tokens/s on {arguments.records:,} records: {speed:.3f}x (target >= 0.90)")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures: {out}")


if __name__ == "__main__":
    main()
