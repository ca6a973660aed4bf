"""``rlhf --method rm``: a reward model trained here, then used as the ``reward-model``
reward by GRPO and as a metric by ``eval``, from its run folder."""

from __future__ import annotations

import json
import random

import pytest

import modelloop
from modelloop.builtin.rewards import reward_model
from modelloop.config import ConfigError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def repeat_pairs(numbers, seed):
    """ "Repeat N.": the answer N is preferred to another number."""
    draw = random.Random(seed)
    return [
        {
            "prompt": f"Repeat {n}.",
            "chosen": str(n),
            "rejected": str(draw.choice([m for m in range(10, 100) if m != n])),
        }
        for n in numbers
        for _ in range(3)
    ]


def ranked_right(path, pairs):
    """The share of pairs whose chosen answer the reward model scores above the rejected one."""
    prompts = [[{"role": "user", "content": pair["prompt"]}] for pair in pairs]
    chosen = reward_model(prompts, [pair["chosen"] for pair in pairs], path=str(path))
    rejected = reward_model(prompts, [pair["rejected"] for pair in pairs], path=str(path))
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


@pytest.fixture(scope="module")
def reward_run(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("reward-model")
    modelloop.rlhf(
        {
            "model": str(tiny_models("qwen2")),
            "method": "rm",
            "data": [write_jsonl(root / "pairs.jsonl", repeat_pairs(range(10, 80), seed=0))],
            "tuner": "lora",
            "lr": 5e-3,
            "max_steps": 80,
            "batch_size": 16,
            "max_length": 64,
            "logging_steps": 10,
            "output_dir": str(root / "rm"),
        }
    )
    return root / "rm"


def test_a_reward_model_ranks_held_out_pairs_better_than_before(reward_run, tiny_models):
    import torch

    held_out = repeat_pairs(range(80, 100), seed=1)  # numbers it never saw
    torch.manual_seed(0)  # the untrained head, as the run's starts (seed 0)
    before = ranked_right(tiny_models("qwen2"), held_out)
    after = ranked_right(reward_run, held_out)
    # measured: 0.38 -> 0.62 on these 60 pairs (a standard error of about 0.065 each)
    assert after >= before + 0.15, (before, after)
    metrics = [json.loads(line) for line in (reward_run / "metrics.jsonl").read_text().splitlines()]
    assert any("accuracy" in record for record in metrics) and (reward_run / "rewards.png").exists()
    assert (reward_run / "model" / "config.json").exists()  # one folder: the adapter merged into the model


def test_the_reward_model_run_scores_grpo_and_eval(reward_run, tiny_models, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Repeat {n}."} for n in range(10, 14)])
    modelloop.rlhf(
        {
            "model": str(tiny_models("qwen2")),
            "method": "grpo",
            "data": [prompts],
            "rewards": ["reward-model"],
            "reward_options": {"reward-model": {"path": str(reward_run)}},
            "num_generations": 2,
            "batch_size": 4,
            "max_completion_length": 4,
            "max_steps": 1,
            "logging_steps": 1,
            "output_dir": str(tmp_path / "grpo"),
        }
    )
    logged = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/reward-model/mean" in record for record in logged)

    data = write_jsonl(
        tmp_path / "tasks.jsonl",
        [
            {"messages": [{"role": "user", "content": f"Repeat {n}."}, {"role": "assistant", "content": str(n)}]}
            for n in range(3)
        ],
    )
    from modelloop.stages.evaluate import evaluate

    result = evaluate(
        str(tiny_models("qwen2")),
        data,
        metrics=["reward:reward-model"],
        metric_options={"reward-model": {"path": str(reward_run)}},
        max_tokens=4,
        output_dir=tmp_path / "eval",
    )
    assert isinstance(result["summary"]["reward:reward-model"], float)


def test_a_reward_model_takes_no_beta(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="a reward model has no reference"):
        modelloop.rlhf({"model": str(tiny_models("qwen2")), "method": "rm", "data": ["x.jsonl"], "beta": 0.1})
