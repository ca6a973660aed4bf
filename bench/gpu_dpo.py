"""DPO and GRPO on one GPU: modelloop against TRL's DPOTrainer and GRPOTrainer with their
defaults (PEFT LoRA), on the same model folder, data and batch shape, each run in its own
process.

The model is bench/gpu_sft.py's (``new-model --family qwen2 --preset qwen2.5-0.5b``:
494 M parameters, vocabulary 151,936), LoRA rank 8 / alpha 16 on every linear layer,
gradient checkpointing off, bf16 (modelloop: bf16 mixed precision, its default on a GPU;
TRL: bf16 weights, as bench/gpu_sft.py runs it).

DPO: 8 pairs a step whose prompt + chosen and prompt + rejected each fill about 1,024
tokens (issue 27's shape), beta 0.1, the reference being the base with the adapter off:

  modelloop dpo              modelloop rlhf --method dpo, its defaults (each prompt
                             computed once, in padding-free rows)
  modelloop dpo trl batches  the same with packing=false (TRL's batches)
  trl dpo                    TRL's DPOTrainer, its defaults

GRPO: prompts of about 200 tokens, 8 completions of up to 256 tokens each (the batch of 8
counts completions, as TRL's does: one prompt's group a step), the ``length`` reward (no
columns needed):

  modelloop grpo             modelloop rlhf --method grpo (its hf rollout engine)
  trl grpo                   TRL's GRPOTrainer, its defaults (transformers' generate)

Speed is tokens per second of training: the tokens TRL counts (``num_tokens``: both
sequences of every pair, padding left out; GRPO: prompts and completions) over the
trainer's runtime, the same count for both. Peak memory is the allocator's peak from the
first step. Prints a table and writes results.json to --out.

  bash .gpu/run.sh python bench/gpu_dpo.py --out "$OUT"                                  (on the lent GPU)
  python bench/gpu_dpo.py --out /tmp/gpu-dpo --preset tiny --steps 4 --tokens 128 --pairs 64   (a CPU smoke run)
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_sft import PEAK_FLOPS, WORDS, parameters  # noqa: E402 - the SFT bench's model, words and FLOPs

LORA = ("--set", "tuner_options.rank=8", "--set", "tuner_options.alpha=16")


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def words_a_token(model: Path) -> float:
    """How many of the bench's words the model's tokenizer puts in a token."""
    from transformers import AutoTokenizer

    sample = words(random.Random(0), 2000)
    return 2000 / len(AutoTokenizer.from_pretrained(model)(sample)["input_ids"])


def preference_pairs(path: Path, count: int, tokens: int, ratio: float, seed: int = 0) -> Path:
    """Pairs whose prompt takes half to three quarters of ``tokens`` tokens (``ratio`` words
    a token) and each answer an eighth to a quarter, less the chat template's."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(count):
            prompt = words(rng, int(rng.randint(tokens // 2, tokens * 3 // 4) * ratio))
            answers = [words(rng, int(rng.randint(tokens // 8, tokens // 4) * ratio)) for _ in range(2)]
            out.write(json.dumps({"prompt": prompt, "chosen": answers[0], "rejected": answers[1]}) + "\n")
    return path


def prompts(path: Path, count: int, tokens: int, ratio: float, seed: int = 1) -> Path:
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(count):
            out.write(json.dumps({"prompt": words(rng, int(tokens * ratio))}) + "\n")
    return path


def run_modelloop(args: argparse.Namespace, method: str, model: Path, data: Path, out: Path, *extra: str) -> dict:
    command = [
        sys.executable, "-m", "modelloop", "rlhf", "--method", method, "--model", str(model), "--data", str(data),
        "--tuner", "lora", *LORA, "--max-steps", str(args.steps), "--batch-size", str(args.rows),
        "--logging-steps", "1", "--lr", "1e-5", "--output-dir", str(out), *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1][:300], "wall_s": wall}
    manifest = json.loads((out / "manifest.json").read_text())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = max(record.get("num_tokens", 0) for record in logged)
    metrics = manifest["metrics"]
    return {
        "tokens_per_s": tokens / metrics["train_seconds"],
        "peak_gib": metrics["peak_memory_mib"] / 1024,
        "loss": metrics.get("train_loss"),
        "wall_s": wall,
        "parameters": parameters(model),
        "compute": manifest.get("compute"),
    }


def dpo_arguments(args: argparse.Namespace) -> tuple[str, ...]:
    return ("--beta", "0.1", "--max-length", str(args.tokens))


def grpo_arguments(args: argparse.Namespace) -> tuple[str, ...]:
    return ("--reward", "length", "--num-generations", "8", "--set", f"max_completion_length={args.tokens // 4}")


def in_own_process(args: argparse.Namespace, runner: str, model: Path, data: Path, out: Path) -> dict:
    """Run TRL's trainer (``runner``: dpo or grpo) in a child process of this script."""
    result = out.parent / f"{out.name}.json"
    command = [
        sys.executable, __file__, "--runner", runner, "--model-dir", str(model), "--data-file", str(data),
        "--result", str(result), "--steps", str(args.steps), "--rows", str(args.rows), "--tokens", str(args.tokens),
        "--out", str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not result.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()
        return {"error": tail[-1][:300] if tail else f"exit {done.returncode}"}
    return {**json.loads(result.read_text()), "wall_s": time.perf_counter() - started, "parameters": parameters(model)}


def peer_run(args: argparse.Namespace) -> None:
    """The child process of ``in_own_process``: TRL's DPOTrainer or GRPOTrainer, defaults."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa"
    )
    if cuda:
        model = model.cuda()
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")

    class PeakFromFirstStep(TrainerCallback):
        def on_train_begin(self, arguments, state, control, **kwargs):
            if cuda:
                torch.cuda.reset_peak_memory_stats()

    shared = dict(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.rows, learning_rate=1e-5,
        logging_steps=1, save_strategy="no", report_to=[], bf16=cuda, use_cpu=not cuda,
    )  # fmt: skip
    dataset = load_dataset("json", data_files=str(args.data_file), split="train")
    if args.runner == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(**shared, beta=0.1, max_length=args.tokens),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[PeakFromFirstStep()],
        )
    else:
        from trl import GRPOConfig, GRPOTrainer

        from modelloop.builtin.rewards import length

        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[length],
            args=GRPOConfig(**shared, num_generations=8, max_completion_length=args.tokens // 4),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[PeakFromFirstStep()],
        )
    outcome = trainer.train()
    tokens = max(record.get("num_tokens", 0) for record in trainer.state.log_history)
    Path(args.result).write_text(
        json.dumps(
            {
                "tokens_per_s": tokens / outcome.metrics["train_runtime"],
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                "loss": outcome.training_loss,
            }
        )
    )


def report(results: dict, cuda: bool) -> str:
    lines = ["| run | tokens/s | peak GiB | MFU | loss | wall s |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        if "error" in result:
            lines.append(f"| {name} | failed: {result['error']} | | | | |")
            continue
        # a DPO token takes the policy's forward and backward and the reference's forward: 8N FLOPs
        mfu = result["tokens_per_s"] * 8 * result["parameters"] / PEAK_FLOPS if cuda else float("nan")
        loss = f"{result['loss']:.3f}" if result.get("loss") is not None else "-"
        lines.append(
            f"| {name} | {result['tokens_per_s']:,.0f} | {result['peak_gib']:.1f} | {mfu:.1%} | {loss} | {result.get('wall_s', 0):.0f} |"
        )
    for mine, theirs in (("modelloop dpo", "trl dpo"), ("modelloop grpo", "trl grpo")):
        a, b = results.get(mine, {}), results.get(theirs, {})
        if a.get("tokens_per_s") and b.get("tokens_per_s"):
            memory = f" at {a['peak_gib'] / b['peak_gib']:.0%} of its peak memory" if b["peak_gib"] else ""
            lines.append(f"{mine} vs {theirs}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s{memory}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024, help="DPO: max_length; GRPO: 5 x a prompt's tokens")
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--only", default="", help="comma-separated run names to keep (default: all)")
    parser.add_argument("--runner", choices=["dpo", "grpo"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runner:
        return peer_run(args)

    import torch

    cuda = torch.cuda.is_available()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MODELLOOP_HOME", str(args.out))
    model = args.out / f"model-{args.preset}"
    if not model.exists():
        command = [sys.executable, "-m", "modelloop", "new-model", "--family", "qwen2", "--preset", args.preset]
        subprocess.run([*command, "--out", str(model), "--device", "cuda" if cuda else "cpu"], check=True)
    ratio = words_a_token(model)
    pairs = preference_pairs(args.out / "pairs.jsonl", args.pairs, args.tokens, ratio)
    questions = prompts(args.out / "prompts.jsonl", args.pairs, args.tokens // 5, ratio)
    runs = {
        "modelloop dpo": lambda out: run_modelloop(args, "dpo", model, pairs, out, *dpo_arguments(args)),
        "modelloop dpo trl batches": lambda out: run_modelloop(
            args, "dpo", model, pairs, out, *dpo_arguments(args), "--set", "packing=false"
        ),
        "trl dpo": lambda out: in_own_process(args, "dpo", model, pairs, out),
        "modelloop grpo": lambda out: run_modelloop(args, "grpo", model, questions, out, *grpo_arguments(args)),
        "trl grpo": lambda out: in_own_process(args, "grpo", model, questions, out),
    }
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    results: dict[str, dict] = {}
    for name, run in runs.items():
        if wanted and name not in wanted:
            continue
        print(f"running {name} ...", flush=True)
        results[name] = run(args.out / name.replace(" ", "-"))
        print(f"  {results[name]}", flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n{time.strftime('%Y-%m-%d')}, {gpu}, {args.preset}: {args.rows} a step, {args.steps} steps")
    print(report(results, cuda))
    (args.out / "results.json").write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "runs": results}, indent=2)
    )


if __name__ == "__main__":
    main()
