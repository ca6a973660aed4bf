"""LoRA DPO end to end, modelloop against ms-swift on the same model, pairs and settings.

The DPO run of the peer baseline (../shared/peer-baseline): its tiny Qwen2 (hidden 256,
4 layers, ~1.6k BPE vocabulary), its 200 preference pairs, LoRA rank 8 / alpha 32 /
dropout 0.05 on all linear layers, max length 128, batch 8, lr 1e-3, beta 0.1, fp32, one
epoch (25 steps), seed 42, the reference being the base with the adapter off. Each variant
runs in its own process, measured as bench/sft_throughput.py measures SFT (wall seconds
and peak RSS by ``/usr/bin/time -v`` once the CPUs are idle, the trainer's own runtime,
the process tree's peak anonymous memory):

  swift                 ms-swift 4.6 ``swift rlhf --rlhf_type dpo``, its defaults
  same settings         modelloop ``rlhf --method dpo``, gradient checkpointing on
  TRL's batches         modelloop's defaults but ``packing=false``: each pair twice,
                        prompt + chosen and prompt + rejected, padded (TRL's layout)
  defaults              modelloop's own defaults (gradient checkpointing off, each
                        pair's prompt computed once in padding-free rows)
  defaults, oneDNN      the same with the linear layers' products forced to oneDNN
                        (cpu_matmul auto leaves them to MKL on Intel processors)

The pairs are the peer's ``dpo.jsonl`` (ms-swift's ``messages`` + ``rejected_response``),
written once in the conversational preference form for modelloop: the same 200 pairs.

Usage (swift needs its venv: PEERS=WORK bash ../shared/peer-baseline/install_peers.sh swift):
  .venv/bin/python bench/dpo_throughput.py --work /tmp/modelloop-peers [--repeat 2]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_throughput import REPO, measure, peer_run  # noqa: E402 - the SFT bench's set-up and measuring


def preference_pairs(swift_pairs: Path) -> Path:
    """The peer's pairs in modelloop's preference form (prompt, chosen, rejected), beside them."""
    out = swift_pairs.with_name("dpo_preference.jsonl")
    with swift_pairs.open() as rows, out.open("w") as written:
        for line in rows:
            row = json.loads(line)
            *prompt, chosen = row["messages"]
            rejected = {"role": "assistant", "content": row["rejected_response"]}
            written.write(json.dumps({"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}) + "\n")
    return out


def modelloop_command(model: Path, pairs: Path, out: Path, *flags: str) -> list[str]:
    return [
        str(REPO / ".venv" / "bin" / "modelloop"), "rlhf", "--method", "dpo", "--model", str(model), "--data", str(pairs),
        "--tuner", "lora", "--set", "tuner_options.rank=8", "--set", "tuner_options.alpha=32",
        "--set", "tuner_options.dropout=0.05", "--max-length", "128", "--batch-size", "8", "--epochs", "1",
        "--lr", "1e-3", "--beta", "0.1", "--dtype", "fp32", "--logging-steps", "10", "--seed", "42",
        "--output-dir", str(out), *flags,
    ]  # fmt: skip


def swift_command(venv: Path, model: Path, pairs: Path, out: Path) -> list[str]:
    return [
        str(venv / "bin" / "swift"), "rlhf", "--rlhf_type", "dpo", "--model", str(model), "--model_type", "qwen2",
        "--template", "qwen", "--torch_dtype", "float32", "--tuner_type", "lora", "--lora_rank", "8",
        "--lora_alpha", "32", "--target_modules", "all-linear", "--max_length", "128",
        "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
        "--num_train_epochs", "1", "--logging_steps", "10", "--split_dataset_ratio", "0", "--eval_strategy", "no",
        "--save_strategy", "steps", "--save_steps", "100000", "--save_total_limit", "1", "--report_to", "none",
        "--dataset_num_proc", "1", "--dataloader_num_workers", "0", "--seed", "42", "--check_model", "false",
        "--beta", "0.1", "--dataset", str(pairs), "--output_dir", str(out),
    ]  # fmt: skip


def main() -> None:
    arguments, work, model, data, env = peer_run("modelloop vs ms-swift LoRA DPO, same run")
    swift_pairs = data.with_name("dpo.jsonl")
    pairs = preference_pairs(swift_pairs)
    venv = work / "swift-venv"
    variants: dict[str, Any] = {}
    if venv.exists() and not arguments.skip_swift:
        variants["ms-swift 4.6 DPO (its defaults)"] = lambda out: swift_command(venv, model, swift_pairs, out)
    variants["modelloop DPO, gradient checkpointing on"] = lambda out: modelloop_command(
        model, pairs, out, "--gradient-checkpointing"
    )
    variants["modelloop DPO, TRL's batches"] = lambda out: modelloop_command(
        model, pairs, out, "--set", "packing=false"
    )
    variants["modelloop DPO defaults"] = lambda out: modelloop_command(model, pairs, out)
    variants["modelloop DPO defaults, cpu_matmul=onednn"] = lambda out: modelloop_command(
        model, pairs, out, "--set", "cpu_matmul=onednn"
    )
    results = measure(variants, work, env, arguments.repeat, prefix="dpo-")

    swift = next((runs for label, runs in results.items() if "ms-swift" in label), None)
    print(
        f"\n{'variant':46} {'wall s':>7} {'train s':>8} {'peak MiB':>9} {'anon MiB':>9} {'wall vs swift':>14} {'train vs swift':>15}"
    )
    for label, runs in results.items():
        wall, runtime = statistics.median(r["wall"] for r in runs), statistics.median(r["runtime"] for r in runs)
        rss, anonymous = statistics.median(r["rss"] for r in runs), statistics.median(r["anonymous"] for r in runs)
        if swift:
            walls = f"{statistics.median(r['wall'] for r in swift) / wall:.2f}x"
            trains = f"{statistics.median(r['runtime'] for r in swift) / runtime:.2f}x"
        else:
            walls = trains = "-"
        print(f"{label:46} {wall:7.1f} {runtime:8.1f} {rss:9.0f} {anonymous:9.0f} {walls:>14} {trains:>15}")
    (work / "bench-out" / "dpo-results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
