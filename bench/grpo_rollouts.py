"""GRPO rollouts on the tiny model: the engines (batched, n choices per prompt) vs TRL's
generate, and asynchronous generation vs synchronous.

The runs are the same ``modelloop rlhf --method grpo`` (LoRA, 8 completions per prompt,
up to ``--completion-length`` tokens, the ``format`` reward), with ``rollout_engine=trl``
(TRL's own ``generate`` call inside the trainer, the baseline), ``hf`` (the engine
protocol over the policy in this process, what vLLM or SGLang would also serve),
``hf-server`` (the same engine in its own process, behind HTTP, the adapter handed over
every step) and ``llamacpp`` (llama.cpp on the base converted to GGUF, the policy's LoRA
adapter converted and loaded at each sync). ``ENGINE@N`` runs it with ``max_staleness=N``:
rollouts generated while the trainer steps, from weights at most N steps old.

``generate s`` is the time the trainer spent on its rollouts: around each path's entry
point, for asynchronous rollouts the time it waited for them; completions/s counts every
completion over it. Steps/min is over the training loop (``train_seconds``, the engine's
start-up included); "after step 1" over the steps after the first (TRL's ``step_time``).

Usage: .venv/bin/python bench/grpo_rollouts.py [--steps 20] [--batch-size 32] [--repeat 2]
       [--engines trl,hf] [--completion-length 16] [--policy sft|base]
e.g.   .venv/bin/python bench/grpo_rollouts.py --engines hf-server,hf-server@1 --completion-length 48
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def write_data(root: Path) -> tuple[Path, Path]:
    sums = [(a, b) for a in range(10) for b in range(10)]
    chats = root / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {a}+{b}?"},
                        {"role": "assistant", "content": f"<answer>{a + b}</answer>" if (a + b) % 2 else str(a + b)},
                    ]
                }
            )
            + "\n"
            for a, b in sums
        )
    )
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"What is {a}+{b}?", "solution": str(a + b)}) + "\n" for a, b in sums)
    )
    return chats, prompts


class Stopwatch:
    """Total seconds and calls of a wrapped method."""

    def __init__(self, owner: type, name: str) -> None:
        self.seconds = 0.0
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="completions per step")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--engines", default="trl,hf", help="rollout engines (ENGINE@N: max_staleness N), the first the baseline"
    )
    parser.add_argument("--completion-length", type=int, default=16, help="max_completion_length")
    parser.add_argument(
        "--policy",
        choices=["sft", "base"],
        default="sft",
        help="sft: the tiny model after a short SFT on the sums (answers in a few tokens); "
        "base: the random tiny model (every completion runs to the length limit, as long reasoning does)",
    )
    arguments = parser.parse_args()
    engines = arguments.engines.split(",")

    from trl import GRPOTrainer

    import modelloop
    from modelloop.models.new_model import new_model
    from modelloop.stages.async_rollouts import AsyncRollouts
    from modelloop.stages.rollouts import EngineRollouts

    engine_clock = Stopwatch(EngineRollouts, "__call__")
    waiting_clock = Stopwatch(AsyncRollouts, "__call__")
    trl_clock = Stopwatch(GRPOTrainer, "_generate_single_turn")
    root = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    chats, prompts = write_data(root)
    base = new_model("qwen2", "tiny", root / "tiny")
    modelloop.sft(
        {
            "model": str(base),
            "data": [str(chats)],
            "tuner": "full",
            "lr": 2e-3,
            "max_steps": 60,
            "max_length": 64,
            "output_dir": str(root / "sft"),
        }
    )

    results: dict[str, list[dict[str, float]]] = {}
    for repeat in range(arguments.repeat):
        for engine in engines:
            name, _, staleness = engine.partition("@")
            clock = trl_clock if name == "trl" else waiting_clock if staleness else engine_clock
            clock.seconds = 0.0
            out = root / f"{engine}-{repeat}"
            started = time.perf_counter()
            modelloop.rlhf(
                {
                    "model": str(root / "sft" if arguments.policy == "sft" else base), "method": "grpo", "data": [str(prompts)], "rewards": ["format"],
                    "reward_options": {"format": {"pattern": r"<answer>\d+</answer>"}}, "num_generations": arguments.generations,
                    "batch_size": arguments.batch_size, "max_completion_length": arguments.completion_length, "lr": 1e-3,
                    "max_steps": arguments.steps, "logging_steps": 1, "beta": 0.0, "rollout_engine": name, "seed": repeat,
                    "max_staleness": int(staleness) if staleness else None, "output_dir": str(out),
                }
            )  # fmt: skip
            wall = time.perf_counter() - started
            completions = arguments.steps * arguments.batch_size
            train = json.loads((out / "manifest.json").read_text())["metrics"]["train_seconds"]
            logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            rewards = [row.get("rewards/format/mean") for row in logged]
            later_steps = [row["step_time"] for row in logged if "step_time" in row][1:]  # the engine started
            results.setdefault(engine, []).append(
                {
                    "generate_s": clock.seconds,
                    "completions_per_s": completions / clock.seconds,
                    "step_s": train / arguments.steps,
                    "steps_per_min": 60 * arguments.steps / train,
                    "later_steps_per_min": 60 / statistics.mean(later_steps),
                    "wall_s": wall,
                    "reward_last": statistics.mean([r for r in rewards if r is not None][-5:]),
                }
            )
            print(f"[{repeat + 1}/{arguments.repeat}] {engine}: {results[engine][-1]}", flush=True)

    print(
        f"\n{arguments.steps} GRPO steps x {arguments.batch_size} completions ({arguments.generations} per prompt, "
        f"<= {arguments.completion_length} tokens), tiny Qwen2 + LoRA, CPU"
    )
    print(
        f"{'rollouts':46} {'generate s':>10} {'completions/s':>14} {'step s':>7} {'steps/min':>9} "
        f"{'after step 1':>12} {'mean reward (last 5)':>21}"
    )
    medians = {}
    for engine in engines:
        name, _, staleness = engine.partition("@")
        label = "TRL generate" if name == "trl" else f"modelloop {name} engine"
        label += f", max_staleness {staleness}" if staleness else ""
        runs = results[engine]
        medians[engine] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        m = medians[engine]
        print(
            f"{label:46} {m['generate_s']:10.2f} {m['completions_per_s']:14.1f} {m['step_s']:7.3f} "
            f"{m['steps_per_min']:9.1f} {m['later_steps_per_min']:12.1f} {m['reward_last']:21.2f}"
        )
    baseline = medians[engines[0]]
    for engine in engines[1:]:
        speed = medians[engine]["completions_per_s"] / baseline["completions_per_s"]
        print(
            f"{engine} / {engines[0]}: {speed:.2f}x completions/s, "
            f"{medians[engine]['steps_per_min'] / baseline['steps_per_min']:.2f}x steps/min, "
            f"{medians[engine]['later_steps_per_min'] / baseline['later_steps_per_min']:.2f}x after step 1"
        )


if __name__ == "__main__":
    main()
