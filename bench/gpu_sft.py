"""SFT on one GPU: modelloop against TRL's SFTTrainer and plain transformers + PEFT, on the
same model folder, data and batch shape, each run in its own process.

The model is ``modelloop new-model --family qwen2 --preset qwen2.5-0.5b`` (random weights,
494 M parameters, vocabulary 151,936, saved in fp32); the data 3,000 generated chats of
40-1,500 words; every run takes batches of 8 rows of up to 2,048 tokens, 30 steps, LoRA
rank 8 on every linear layer but the output layer where it trains adapters, gradient
checkpointing off:

  modelloop lora      modelloop sft --tuner lora: its defaults (bf16 mixed precision,
                      packed rows, flex or flash attention, the loss in the output layer)
  modelloop full      the same with --tuner full (fp32 master weights)
  modelloop lora liger  modelloop lora with --accelerator liger (Liger's kernels and fused loss)
  modelloop lora checkpointed  modelloop lora with --gradient-checkpointing (the memory it can save)
  trl lora            TRL's SFTTrainer, its defaults with packing on, PEFT LoRA, bf16 weights
  hf lora             transformers' Trainer + PEFT LoRA, bf16 weights, padded rows
  modelloop qlora 7b  --tuner qlora on a qwen2.5-7b-shape model, 1 row of 4,096 tokens a step,
                      gradient checkpointing on (the memory target)

Speed is measured alike for every run: tokens (not padding) handed to the model per second
over windows of 5 steps, the first window (compilation, warm-up) left out. Peak memory is
the allocator's peak from the first step; MFU counts 6 x parameters FLOPs a token against
the H200's 989 TFLOP/s dense bf16. Prints a table and writes results.json to --out.

  bash .gpu/run.sh python bench/gpu_sft.py --out "$OUT"            (on the lent GPU)
  python bench/gpu_sft.py --out /tmp/gpu-sft --preset tiny --steps 10 --max-length 256 --chats 300   (a CPU smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PEAK_FLOPS = 989e12  # H200 dense bf16
WINDOW = 5  # steps per speed window
WORDS = (
    "the model learns what users ask and answers them with care about data training tokens loss memory kernel "
    "river tiger apple violet number question reason because therefore however planet music history language"
).split()


def chats(path: Path, count: int, seed: int = 0) -> Path:
    """``count`` chats whose question and answer together run 40-1,500 words."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(count):
            words = rng.randint(40, 1500)
            asked = max(5, words // 5)
            question = " ".join(rng.choice(WORDS) for _ in range(asked))
            answer = " ".join(rng.choice(WORDS) for _ in range(words - asked))
            out.write(
                json.dumps(
                    {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
                )
                + "\n"
            )
    return path


def steady_speed(windows: list[float]) -> float:
    """Tokens per second over the windows after the first."""
    kept = windows[1:] or windows
    return sum(kept) / len(kept) if kept else 0.0


# --------------------------------------------------------------------------- the runs


def run_modelloop(args: argparse.Namespace, model: Path, data: Path, out: Path, tuner: str, *extra: str) -> dict:
    command = [
        sys.executable, "-m", "modelloop", "sft", "--model", str(model), "--data", str(data), "--tuner", tuner,
        "--max-steps", str(args.steps), "--batch-size", str(args.rows), "--max-length", str(args.max_length),
        "--set", f"logging_steps={WINDOW}", "--lr", "1e-4", "--output-dir", str(out), *extra,
    ]  # fmt: skip
    if tuner != "full":
        command += ["--set", "tuner_options.rank=8", "--set", "tuner_options.alpha=16"]
    if "--gradient-checkpointing" not in extra:
        command.append("--no-gradient-checkpointing")
    run = modelloop_run(command, out)
    if "error" in run:
        return run
    metrics = run["manifest"]["metrics"]
    return {
        "tokens_per_s": steady_speed(
            [record["tokens_per_second"] for record in run["logged"] if record.get("tokens_per_second")]
        ),
        "peak_gib": metrics["peak_memory_mib"] / 1024,
        "loss": metrics.get("train_loss"),
        "wall_s": run["wall_s"],
        "parameters": parameters(model),
        "compute": run["manifest"].get("compute"),
    }


def modelloop_run(command: list[str], out: Path) -> dict:
    """Run ``command`` (a modelloop stage writing its run to ``out``, its output kept beside
    as ``out.log``): the wall seconds with the run's manifest and metrics.jsonl records, or
    the command's last line of error."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1][:300], "wall_s": wall}
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "manifest": json.loads((out / "manifest.json").read_text()), "logged": logged}


def in_own_process(args: argparse.Namespace, runner: str, model: Path, data: Path, out: Path) -> dict:
    """Run ``runner`` (trl or hf) in a child process of this script; its result as a dict."""
    shape = ["--steps", str(args.steps), "--rows", str(args.rows), "--max-length", str(args.max_length)]
    return in_child(__file__, runner, model, data, out, shape)


def in_child(script: str, runner: str, model: Path, data: Path, out: Path, arguments: list[str]) -> dict:
    """Run ``script --runner runner`` on the model and data in a child process; the dict it
    writes to ``--result``, with the wall time and the parameter count, or its error."""
    result = out.parent / f"{out.name}.json"
    command = [
        sys.executable, script, "--runner", runner, "--model-dir", str(model), "--data-file", str(data),
        "--result", str(result), "--out", str(out), *arguments,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not result.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()
        return {"error": tail[-1][:300] if tail else f"exit {done.returncode}"}
    return {**json.loads(result.read_text()), "wall_s": time.perf_counter() - started, "parameters": parameters(model)}


def peer_run(args: argparse.Namespace) -> None:
    """The child process of ``in_own_process``: TRL's SFTTrainer or transformers' Trainer."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    pad = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa"
    )
    if cuda:
        model = model.cuda()
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    counted = {"tokens": 0}

    def counting(collate):
        def collate_and_count(features):
            batch = collate(features)
            counted["tokens"] += (
                int((batch["input_ids"] != pad).sum())
                if "attention_mask" not in batch
                else int(batch["attention_mask"].sum())
            )
            return batch

        return collate_and_count

    class Speed(TrainerCallback):
        def __init__(self):
            self.windows, self.mark = [], None

        def on_train_begin(self, arguments, state, control, **kwargs):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.mark = (time.perf_counter(), counted["tokens"])

        def on_step_end(self, arguments, state, control, **kwargs):
            if state.global_step % WINDOW == 0:
                if cuda:
                    torch.cuda.synchronize()
                now, tokens = time.perf_counter(), counted["tokens"]
                self.windows.append((tokens - self.mark[1]) / (now - self.mark[0]))
                self.mark = (now, tokens)

    speed = Speed()
    shared = dict(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.rows, learning_rate=1e-4, logging_steps=WINDOW,
        save_strategy="no", report_to=[], gradient_checkpointing=False, bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0,
    )  # fmt: skip
    dataset = load_dataset("json", data_files=str(args.data_file), split="train")
    if args.runner == "trl":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**shared, max_length=args.max_length, packing=True)
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[speed],
        )
    else:
        from peft import get_peft_model
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

        def tokenize(record):
            ids = tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"][
                : args.max_length
            ]
            return {"input_ids": ids}

        tokenized = dataset.map(tokenize, remove_columns=dataset.column_names)
        trainer = Trainer(
            model=get_peft_model(model, lora), args=TrainingArguments(**shared, remove_unused_columns=False), train_dataset=tokenized,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[speed],
        )  # fmt: skip
    trainer.data_collator = counting(trainer.data_collator)
    outcome = trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    Path(args.result).write_text(
        json.dumps({"tokens_per_s": steady_speed(speed.windows), "peak_gib": peak, "loss": outcome.training_loss})
    )


# --------------------------------------------------------------------------- the table


def parameters(model: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())


def report(results: dict, cuda: bool, pairs: tuple[tuple[str, str], ...], flops_a_parameter: int = 6) -> str:
    """The table (MFU: ``flops_a_parameter`` FLOPs per parameter a token), then each pair's
    (mine, theirs) speed and memory ratio."""
    lines = ["| run | tokens/s | peak GiB | MFU | loss | wall s |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        if "error" in result:
            lines.append(f"| {name} | failed: {result['error']} | | | | |")
            continue
        mfu = result["tokens_per_s"] * flops_a_parameter * result["parameters"] / PEAK_FLOPS if cuda else float("nan")
        result["mfu"] = mfu
        loss = f"{result['loss']:.3f}" if result.get("loss") is not None else "-"
        lines.append(
            f"| {name} | {result['tokens_per_s']:,.0f} | {result['peak_gib']:.1f} | {mfu:.1%} | {loss} | {result.get('wall_s', 0):.0f} |"
        )
    for mine, theirs in pairs:
        a, b = results.get(mine, {}), results.get(theirs, {})
        if a.get("tokens_per_s") and b.get("tokens_per_s"):
            memory = f" at {a['peak_gib'] / b['peak_gib']:.0%} of its peak memory" if b["peak_gib"] else ""
            lines.append(f"{mine} vs {theirs}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s{memory}")
    return "\n".join(lines)


def bench_parser(doc: str, *, runners: tuple[str, ...], steps: int) -> argparse.ArgumentParser:
    """The options a GPU bench shares: where to write, the model's preset, steps and rows a
    step, which runs; and, hidden, those its child processes take (``in_child``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--only", default="", help="comma-separated run names to keep (default: all)")
    parser.add_argument("--runner", choices=runners, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = bench_parser(__doc__, runners=("trl", "hf"), steps=30)
    parser.add_argument("--big-preset", default="qwen2.5-7b", help="the QLoRA memory run's shape ('' leaves it out)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--chats", type=int, default=3000)
    args = parser.parse_args()
    if args.runner:
        return peer_run(args)

    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MODELLOOP_HOME", str(args.out))
    model = args.out / f"model-{args.preset}"
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
                args.preset,
                "--out",
                str(model),
                "--device",
                device,
            ],
            check=True,
        )
    data = chats(args.out / "chats.jsonl", args.chats)
    runs = {
        "modelloop lora": lambda out: run_modelloop(args, model, data, out, "lora"),
        "trl lora": lambda out: in_own_process(args, "trl", model, data, out),
        "modelloop full": lambda out: run_modelloop(args, model, data, out, "full"),
        "modelloop lora liger": lambda out: run_modelloop(args, model, data, out, "lora", "--accelerator", "liger"),
        "modelloop lora checkpointed": lambda out: run_modelloop(
            args, model, data, out, "lora", "--gradient-checkpointing"
        ),
        "hf lora": lambda out: in_own_process(args, "hf", model, data, out),
    }
    if args.big_preset:
        big = args.out / f"model-{args.big_preset}"

        def qlora(out: Path) -> dict:
            if not big.exists():
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "modelloop",
                        "new-model",
                        "--family",
                        "qwen2",
                        "--preset",
                        args.big_preset,
                        "--out",
                        str(big),
                        "--device",
                        device,
                        "--dtype",
                        "bf16",
                    ],
                    check=True,
                )
            settings = argparse.Namespace(
                **{**vars(args), "rows": 1, "max_length": 2 * args.max_length, "steps": min(args.steps, 10)}
            )
            return run_modelloop(settings, big, data, out, "qlora", "--gradient-checkpointing")

        runs[f"modelloop qlora {args.big_preset}"] = qlora
    results = run_each(runs, args.only, args.out)
    compared = ("modelloop lora", "modelloop lora liger", "modelloop lora checkpointed")
    table = report(results, cuda, pairs=tuple((name, "trl lora") for name in compared))
    shape = f"{args.rows} rows x {args.max_length} tokens, {args.steps} steps"
    print(f"\n{time.strftime('%Y-%m-%d')}, {write_results(args.out, results)}, {args.preset}: {shape}\n{table}")


def run_each(runs: dict[str, Any], only: str, out: Path) -> dict[str, dict]:
    """Each run of ``runs`` (name -> its output folder -> result) named in ``only`` (a
    comma-separated list; empty: all), its result printed and kept in results.json as it comes."""
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    results: dict[str, dict] = {}
    for name, run in runs.items():
        if wanted and name not in wanted:
            continue
        print(f"running {name} ...", flush=True)
        results[name] = run(out / name.replace(" ", "-"))
        print(f"  {results[name]}", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def write_results(out: Path, results: dict[str, dict]) -> str:
    """results.json with the date and the device; returns the device's name."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    (out / "results.json").write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "runs": results}, indent=2)
    )
    return gpu


if __name__ == "__main__":
    main()
