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
from gpu_sft import WORDS, bench_parser, in_child, modelloop_run, parameters, report, run_each, write_results  # noqa: E402 - shared with the SFT bench

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
    run = modelloop_run(command, out)
    if "error" in run:
        return run
    metrics = run["manifest"]["metrics"]
    return {
        "tokens_per_s": max(record.get("num_tokens", 0) for record in run["logged"]) / metrics["train_seconds"],
        "peak_gib": metrics["peak_memory_mib"] / 1024,
        "loss": metrics.get("train_loss"),
        "wall_s": run["wall_s"],
        "parameters": parameters(model),
        "compute": run["manifest"].get("compute"),
    }


def dpo_arguments(args: argparse.Namespace) -> tuple[str, ...]:
    return ("--beta", "0.1", "--max-length", str(args.tokens))


def grpo_arguments(args: argparse.Namespace) -> tuple[str, ...]:
    return ("--reward", "length", "--num-generations", "8", "--set", f"max_completion_length={args.tokens // 4}")


def in_own_process(args: argparse.Namespace, runner: str, model: Path, data: Path, out: Path) -> dict:
    """Run TRL's trainer (``runner``: dpo or grpo) in a child process of this script."""
    shape = ["--steps", str(args.steps), "--rows", str(args.rows), "--tokens", str(args.tokens)]
    return in_child(__file__, runner, model, data, out, shape)


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


def main() -> None:
    parser = bench_parser(__doc__, runners=("dpo", "grpo"), steps=20)
    parser.add_argument("--tokens", type=int, default=1024, help="DPO: max_length; GRPO: 5 x a prompt's tokens")
    parser.add_argument("--pairs", type=int, default=400)
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
    results = run_each(runs, args.only, args.out)
    print(f"\n{time.strftime('%Y-%m-%d')}, {write_results(args.out, results)}, {args.preset}: {args.steps} steps")
    # a DPO token costs the policy's forward and backward and the reference's forward: 8N FLOPs
    print(
        report(results, cuda, pairs=(("modelloop dpo", "trl dpo"), ("modelloop grpo", "trl grpo")), flops_a_parameter=8)
    )


if __name__ == "__main__":
    main()
