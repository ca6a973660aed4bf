"""Rewards: the built-ins, and custom rewards found three ways and checked before a model loads."""

from __future__ import annotations

import json
import shutil

import pytest

from modelloop.registry import REWARDS, get_registry
from modelloop.rewards import RewardError, check_columns, check_on_sample, find_reward, resolve_rewards, sample_batch


def said(text):
    return [{"role": "assistant", "content": text}]


def test_hook_register_rewards_builtins():
    assert {"exact", "accuracy", "format", "length", "repetition", "reward-model"} <= set(get_registry(REWARDS).names())
    assert get_registry(REWARDS).get("reward-model").needs_model
    assert not get_registry(REWARDS).get("accuracy").needs_model


def test_accuracy_reads_boxed_answers_and_the_last_number():
    accuracy = get_registry(REWARDS).get("accuracy").score
    completions = [
        said("so the answer is \\boxed{42}."),
        said("41, no wait: 42"),
        said("\\boxed{41} or 42"),
        said("42.0"),
        said("no idea"),
    ]
    assert accuracy(["q"] * 5, completions, solution=["42"] * 5) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert accuracy(["q"], [said("The answer: \\boxed{1,234}")], solution=["1234"]) == [1.0]
    assert accuracy(["q"], [said(" Paris. ")], solution=["paris"]) == [1.0]


def test_format_length_and_repetition():
    rewards = get_registry(REWARDS)
    fmt = rewards.get("format").score
    assert fmt(["q"] * 2, [said("<think>add</think> <answer>7</answer>"), said("7")]) == [1.0, 0.0]
    assert fmt(["q"] * 2, [said("Answer: 7"), said("7")], pattern=r"Answer: \d+") == [1.0, 0.0]
    length = rewards.get("length").score
    assert length(["q"] * 3, [said(""), said("abcd"), said("x" * 30)], min_chars=2, max_chars=10) == [-1.0, 0.0, -1.0]
    assert length(["q"], [said("x" * 15)], min_chars=2, max_chars=10) == [-0.5]
    repetition = rewards.get("repetition").score
    assert repetition(["q"] * 3, [said("a b c d e"), said("go go go go go"), said("hi")], ngram=2) == [0.0, -0.75, 0.0]


def test_reward_model_scores_prompt_and_completion_batched(tmp_path, tiny_models):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models("qwen2"), num_labels=1)
    model.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_models("qwen2")).save_pretrained(tmp_path / "rm")
    prompts = [[{"role": "user", "content": f"Say {n}"}] for n in range(5)]
    completions = [said(str(n)) for n in range(5)]
    score = get_registry(REWARDS).get("reward-model").score
    batched = score(prompts, completions, path=str(tmp_path / "rm"), batch_size=2)
    alone = [score([p], [c], path=str(tmp_path / "rm"))[0] for p, c in zip(prompts, completions)]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) > 1
    with pytest.raises(ValueError, match="reward_options.reward-model.path"):
        score(prompts, completions)


MODULE = """
import asyncio

def politeness(prompts, completions, **columns):
    '''1 for a completion that says please.'''
    return [float("please" in c[-1]["content"].lower()) for c in completions]

async def slow_politeness(prompts, completions, *, bonus=0.0, **columns):
    await asyncio.sleep(0)
    return [float("please" in c[-1]["content"].lower()) + bonus for c in completions]

def no_kwargs(prompts, completions):
    return [0.0] * len(completions)

def too_few(prompts, completions, **columns):
    return [1.0]

def words(prompts, completions, **columns):
    return ["good"] * len(completions)

def broken(prompts, completions, **columns):
    raise KeyError("solution")

def scalar(prompts, completions, **columns):
    return 1.0

def not_a_number(prompts, completions, **columns):
    return [float("nan")] * len(completions)

def infinite(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1) + [float("inf")]

def nan_in_training(prompts, completions, **columns):  # fine on the sample batch, not at a later step
    return [float("nan") if index == 2 and len(completions) > 4 else 1.0 for index in range(len(completions))]

NOT_CALLABLE = 3
"""


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "team_rewards.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "team_rewards.py"


def test_a_reward_is_found_by_name_import_path_or_file(reward_module):
    assert find_reward("accuracy") is get_registry(REWARDS).get("accuracy")
    by_import = find_reward("team_rewards:politeness")
    by_file = find_reward(f"{reward_module}:politeness")
    assert by_import.description == by_file.description == "1 for a completion that says please."
    assert by_file.score(["q"], [said("Please sit")]) == [1.0]


def test_options_are_the_keyword_only_parameters(reward_module):
    (bound,) = resolve_rewards(
        ["team_rewards:slow_politeness"], [2.0], {"team_rewards:slow_politeness": {"bonus": 0.5}}
    )
    prompts, completions, columns = sample_batch(
        [{"prompt": [{"role": "user", "content": "hi"}], "solution": "please"}]
    )
    assert check_on_sample(bound, prompts, completions, columns) == [1.5, 0.5]
    assert bound.score.__name__ == "team_rewards:slow_politeness"
    with pytest.raises(RewardError, match="unknown option 'bonsu' \\(its options: bonus\\)"):
        resolve_rewards(["team_rewards:slow_politeness"], None, {"team_rewards:slow_politeness": {"bonsu": 1}})
    with pytest.raises(RewardError, match="reward_options for 'format', which is not one of the rewards"):
        resolve_rewards(["accuracy"], None, {"format": {"pattern": "x"}})
    with pytest.raises(RewardError, match="2 reward weights for 1 rewards"):
        resolve_rewards(["accuracy"], [1.0, 2.0], {})


def test_a_short_name_carries_the_options_and_names_the_metrics(reward_module):
    given = f"bonus={reward_module}:slow_politeness"
    (bound,) = resolve_rewards([given], None, {"bonus": {"bonus": 0.25}})
    prompts, completions, columns = sample_batch(
        [{"prompt": [{"role": "user", "content": "hi"}], "solution": "please"}]
    )
    assert bound.name == bound.score.__name__ == "bonus"  # GRPO logs rewards/bonus/mean
    assert check_on_sample(bound, prompts, completions, columns) == [1.25, 0.25]
    with pytest.raises(
        RewardError,
        match="reward_options for 'team_rewards:slow_politeness', which is not one of the rewards \\(bonus\\)",
    ):
        resolve_rewards([given], None, {"team_rewards:slow_politeness": {"bonus": 1}})
    with pytest.raises(RewardError, match="two rewards are named 'accuracy'; give one a short name"):
        resolve_rewards(["accuracy", "accuracy=team_rewards:politeness"], None, {})


@pytest.mark.parametrize(
    "reference, message",
    [
        ("acuracy", "Unknown reward 'acuracy'. Did you mean 'accuracy'?"),
        ("team_rewards:nothing", "team_rewards has no attribute 'nothing'"),
        ("team_rewards:NOT_CALLABLE", "NOT_CALLABLE is a int, not a function or a Reward"),
        ("no_such_module:score", "cannot import no_such_module: ModuleNotFoundError"),
        ("./missing.py:score", "no such file"),
        (
            "team_rewards:no_kwargs",
            r"no_kwargs must accept \(prompts, completions, \*\*columns\); it is no_kwargs\(prompts, completions\)",
        ),
    ],
)
def test_a_reward_that_cannot_be_found_or_called_is_named(reference, message, reward_module):
    with pytest.raises(RewardError, match=message):
        resolve_rewards([reference], None, {})


@pytest.mark.parametrize(
    "name, message",
    [
        ("too_few", "returned 1 scores for 4 completions; it must return one per completion"),
        ("words", r"returned 'good' \(str\) for completion 0; scores must be numbers"),
        ("broken", "failed on a sample batch of 4: KeyError: 'solution'"),
        ("scalar", "returned a float; it must return a list of numbers"),
        ("not_a_number", "returned nan for completion 0; scores must be finite numbers"),
        ("infinite", "returned inf for completion 3; scores must be finite numbers"),
    ],
)
def test_a_bad_reward_fails_on_the_sample_batch(name, message, reward_module):
    (bound,) = resolve_rewards([f"team_rewards:{name}"], None, {})
    records = [{"prompt": [{"role": "user", "content": f"q{n}"}], "solution": str(n)} for n in range(3)]
    with pytest.raises(RewardError, match=f"reward 'team_rewards:{name}' {message}"):
        check_on_sample(bound, *sample_batch(records))


def test_every_step_checks_the_scores_and_names_the_completion(reward_module):
    (bound,) = resolve_rewards(["team_rewards:nan_in_training"], None, {})
    records = [{"prompt": [{"role": "user", "content": f"q{n}"}], "solution": str(n)} for n in range(2)]
    assert check_on_sample(bound, *sample_batch(records)) == [1.0] * 4
    prompts = ["q"] * 8  # what GRPO hands the reward at a step: bound.score is its reward function
    with pytest.raises(RewardError, match="reward 'team_rewards:nan_in_training' returned nan for completion 2"):
        bound.score(prompts, [said("ok")] * 8)


@pytest.mark.parametrize("ending", ["import sys\nsys.exit(3)\n", "raise SystemExit('no GPU here')\n"])
def test_a_reward_module_that_exits_at_import_is_named(tmp_path, ending):
    module = tmp_path / "exits.py"
    module.write_text(ending + "def score(prompts, completions, **columns):\n    return [1.0] * len(completions)\n")
    with pytest.raises(RewardError, match=r"exits.py failed to load: SystemExit"):
        resolve_rewards([f"{module}:score"], None, {})


@pytest.mark.parametrize(
    "reward, message",
    [
        ("./team_rewards.py:too_few", "returned 1 scores for 4 completions"),
        ("./team_rewards.py:no_kwargs", "no_kwargs must accept (prompts, completions, **columns)"),
        ("./team_rewards.py:broken", "failed on a sample batch of 4: KeyError"),
        ("acuracy", "Did you mean 'accuracy'?"),
    ],
)
def test_the_cli_names_a_bad_reward_before_any_model_loads(
    reward, message, reward_module, tiny_models, tmp_path, monkeypatch
):
    from click.testing import CliRunner

    from modelloop.cli import build_cli

    weightless = tmp_path / "weightless"  # a model folder whose weights are gone: loading it would fail
    shutil.copytree(tiny_models("qwen2"), weightless)
    for weights in weightless.glob("*.safetensors"):
        weights.unlink()
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {n}+1?", "solution": str(n + 1)}) + "\n" for n in range(4)))
    monkeypatch.chdir(reward_module.parent)  # ./team_rewards.py is found from where the command runs
    result = CliRunner().invoke(
        build_cli(), ["rlhf", "--method", "grpo", "--model", str(weightless), "--data", str(data), "--reward", reward]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_reward_column_missing_from_the_data_is_named(reward_module):
    records = [{"prompt": "q1", "solution": "1"}, {"prompt": "q2", "topic": "math"}]
    rewards = resolve_rewards(["accuracy", "team_rewards:politeness"], None, {})
    with pytest.raises(
        RewardError, match="reward 'accuracy' needs a 'solution' column, and record 2 of the data has none"
    ):
        check_columns(rewards, records)
    prompts, completions, columns = sample_batch(records)
    assert {key: len(values) for key, values in columns.items()} == {"solution": 4, "topic": 4}  # one per completion
    assert columns["solution"] == ["1", "1", None, None]
