"""LoRA SFT end to end, modelloop against ms-swift on the same model, data and settings.

The run of the peer baseline (../shared/peer-baseline, README there): a Qwen2-architecture
model (hidden 256, intermediate 688, 4 layers, 4 heads, 2 KV heads, ~1.6k BPE vocab),
2000 generated chat examples (~85k tokens), LoRA rank 8 / alpha 32 / dropout 0.05 on all
linear layers but lm_head, max length 128, batch 8, lr 1e-3 cosine, weight decay 0.1,
adam beta2 0.95, fp32, one epoch, seed 42. Each variant runs in its own process under
``/usr/bin/time -v`` (wall seconds, peak RSS) after the CPUs go idle, and the peak of its
process tree's anonymous memory is sampled beside it (``timed``):

  swift            ms-swift 4.6, its defaults (gradient checkpointing on, no packing)
  same settings    modelloop, gradient checkpointing on, packing off (cpu_matmul auto: oneDNN,
                   but torch's BLAS where that is MKL on an Intel processor)
  + BLAS, oneDNN   the same with each choice forced (--set cpu_matmul=blas, =onednn)
  + packing        modelloop, gradient checkpointing on, packing on
  defaults         modelloop's own defaults: packing on, gradient checkpointing off

Usage (swift needs its venv: PEERS=WORK bash ../shared/peer-baseline/install_peers.sh swift):
  .venv/bin/python bench/sft_throughput.py --work /tmp/peers [--repeat 3] [--shared ../shared/peer-baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOKENS_IN_EPOCH = 85_004  # the templated train set, as the peer baseline counts it (check_tokenizer.py)
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "MODELSCOPE_OFFLINE": "1",
    "USE_HF": "1",
}


def wait_for_idle_cpus(limit: float = 120.0) -> None:
    """Wait (up to ``limit`` s) until the machine is under 20 % busy over a second."""

    def busy() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        (b1, t1), _ = busy(), time.sleep(1)
        b2, t2 = busy()
        if (b2 - b1) / max(1, t2 - t1) < 0.2:
            return


def process_tree(root: int) -> set[int]:
    """``root`` and every process below it."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    members, frontier = {root}, {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - members
        members |= frontier
    return members


def anonymous_kib(pids: set[int]) -> int:
    """The processes' resident anonymous memory (``RssAnon``), in KiB."""
    total = 0
    for pid in pids:
        try:
            total += next(
                int(line.split()[1])
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("RssAnon:")
            )
        except (OSError, StopIteration):
            continue
    return total


def timed(command: list[str], env: dict[str, str], log: Path, out: Path) -> dict[str, float]:
    """Wall seconds and peak RSS (``/usr/bin/time``), the trainer's own runtime, and the peak
    of the process tree's anonymous memory (sampled every 50 ms): unlike RSS, which also
    counts the mapped pages of the libraries' files and so grows with how much of them the
    page cache holds (more right after an install), it is what the run itself allocates."""
    wait_for_idle_cpus()
    peak_anonymous, samples = 0, 0
    with log.open("w") as output:
        running = subprocess.Popen(["/usr/bin/time", "-v", *command], env=env, stdout=output, stderr=subprocess.STDOUT)
        while running.poll() is None:
            if samples % 20 == 0:  # the tree is walked once a second, the memory read every 50 ms
                members = process_tree(running.pid)
            peak_anonymous = max(peak_anonymous, anonymous_kib(members))
            samples += 1
            time.sleep(0.05)
    text = log.read_text()
    if running.returncode != 0:
        raise SystemExit(f"failed ({running.returncode}): {' '.join(command)}\n{text[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    if (out / "manifest.json").exists():  # modelloop's run folder
        runtime = json.loads((out / "manifest.json").read_text())["metrics"]["train_runtime"]
    else:  # ms-swift prints its trainer's final metrics
        runtime = float(re.findall(r"""['"]train_runtime['"]:\s*'?([\d.]+)""", text)[-1])
    return {
        "wall": hours * 3600 + minutes * 60 + seconds,
        "rss": rss / 1024,
        "anonymous": peak_anonymous / 1024,
        "runtime": runtime,
    }


def prepare(work: Path, shared: Path) -> tuple[Path, Path]:
    data, model = work / "data" / "train.jsonl", work / "tiny-qwen2"
    if not data.exists():
        subprocess.run([sys.executable, shared / "make_data.py", work / "data"], check=True)
    if not model.exists():
        subprocess.run([sys.executable, shared / "make_tiny.py", model, work / "data" / "corpus.txt"], check=True)
    return model, data


def modelloop_command(model: Path, data: Path, out: Path, *flags: str) -> list[str]:
    return [
        str(REPO / ".venv" / "bin" / "modelloop"), "sft", "--model", str(model), "--data", str(data), "--tuner", "lora",
        "--set", "tuner_options.rank=8", "--set", "tuner_options.alpha=32", "--set", "tuner_options.dropout=0.05",
        "--max-length", "128", "--batch-size", "8", "--epochs", "1", "--lr", "1e-3", "--set", "weight_decay=0.1",
        "--set", "adam_beta2=0.95", "--dtype", "fp32", "--logging-steps", "10", "--seed", "42", "--output-dir", str(out), *flags,
    ]  # fmt: skip


def swift_command(venv: Path, model: Path, data: Path, out: Path) -> list[str]:
    return [
        str(venv / "bin" / "swift"), "sft", "--model", str(model), "--model_type", "qwen2", "--template", "qwen",
        "--torch_dtype", "float32", "--tuner_type", "lora", "--lora_rank", "8", "--lora_alpha", "32",
        "--target_modules", "all-linear", "--max_length", "128", "--per_device_train_batch_size", "8",
        "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--num_train_epochs", "1", "--logging_steps", "10",
        "--split_dataset_ratio", "0", "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "100000",
        "--save_total_limit", "1", "--report_to", "none", "--dataset_num_proc", "1", "--dataloader_num_workers", "0",
        "--seed", "42", "--check_model", "false", "--dataset", str(data), "--output_dir", str(out),
    ]  # fmt: skip


def peer_run(description: str) -> tuple[argparse.Namespace, Path, Path, Path, dict[str, str]]:
    """The command line of a peer bench, and what it runs on: its arguments, the work
    folder, the peer baseline's model and data (made once) and the offline environment."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work", type=Path, default=Path("/tmp/modelloop-peers"))
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "peer-baseline")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--skip-swift", action="store_true")
    arguments = parser.parse_args()
    work = arguments.work.resolve()
    (work / "bench-out").mkdir(parents=True, exist_ok=True)
    model, data = prepare(work, arguments.shared.resolve())
    env = {
        **os.environ,
        **OFFLINE,
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        "MODELLOOP_HOME": str(work / "ml-home"),
    }
    return arguments, work, model, data, env


def measure(
    variants: dict[str, Any], work: Path, env: dict[str, str], repeat: int, prefix: str = ""
) -> dict[str, list[dict[str, float]]]:
    """Each variant's command (``out -> argv``) run ``repeat`` times in turn, measured by ``timed``."""
    results: dict[str, list[dict[str, float]]] = {}
    for attempt in range(repeat):
        for label, command in variants.items():
            name = f"{prefix}{len(results.get(label, []))}-{re.sub(r'[^a-z0-9]+', '-', label.lower())}"
            out = work / "bench-out" / name
            shutil.rmtree(out, ignore_errors=True)
            measured = timed(command(out), env, work / "bench-out" / f"{name}.log", out)
            results.setdefault(label, []).append(measured)
            print(
                f"[{attempt + 1}/{repeat}] {label}: {measured['wall']:.1f} s wall, {measured['runtime']:.1f} s train, "
                f"{measured['rss']:.0f} MiB peak RSS, {measured['anonymous']:.0f} MiB peak anonymous",
                flush=True,
            )
    return results


def main() -> None:
    arguments, work, model, data, env = peer_run("modelloop vs ms-swift LoRA SFT, same run")
    venv = work / "swift-venv"
    variants: dict[str, Any] = {}
    if venv.exists() and not arguments.skip_swift:
        variants["ms-swift 4.6 (GC on, no packing)"] = lambda out: swift_command(venv, model, data, out)
    variants["modelloop, same settings (GC on, no packing)"] = lambda out: modelloop_command(
        model, data, out, "--gradient-checkpointing", "--no-packing"
    )
    for matmul in ("blas", "onednn"):
        variants[f"modelloop, same settings, cpu_matmul={matmul}"] = lambda out, matmul=matmul: modelloop_command(
            model, data, out, "--gradient-checkpointing", "--no-packing", "--set", f"cpu_matmul={matmul}"
        )
    variants["modelloop, GC on, packing on"] = lambda out: modelloop_command(
        model, data, out, "--gradient-checkpointing", "--packing"
    )
    variants["modelloop defaults (packing on, GC off)"] = lambda out: modelloop_command(model, data, out)

    results = measure(variants, work, env, arguments.repeat)
    baseline = (
        statistics.median(r["wall"] for r in next(iter(results.values())))
        if "ms-swift" in next(iter(results))
        else None
    )
    print(
        f"\n{'variant':48} {'wall s (median)':>15} {'train s':>8} {'tokens/s':>9} {'peak MiB':>9} {'anon MiB':>9} {'vs swift':>9}"
    )
    for label, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        runtime = statistics.median(r["runtime"] for r in runs)
        rss = statistics.median(r["rss"] for r in runs)
        anonymous = statistics.median(r["anonymous"] for r in runs)
        ratio = f"{baseline / wall:.2f}x" if baseline else "-"
        print(
            f"{label:48} {wall:15.1f} {runtime:8.1f} {TOKENS_IN_EPOCH / runtime:9.0f} {rss:9.0f} {anonymous:9.0f} {ratio:>9}"
        )
    (work / "bench-out" / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
