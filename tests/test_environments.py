"""GRPO in environments: episodes of several turns, tool calls read with each family's own
format, observations masked out of the loss, and learning on the calculator task."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest

import modelloop
from modelloop import hookimpl
from modelloop.builtin.environments import CALCULATOR_TOOL, calculate, start_quiz
from modelloop.builtin.full_tuner import FULL
from modelloop.environments import ENVIRONMENT_REWARD, EnvironmentFailure, bind_environment, environment_reward
from modelloop.plugins import PluginInfo, get_plugin_manager
from modelloop.registry import TEMPLATES, get_registry
from modelloop.specs import Environment, Step, Turn


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def logged(run, key):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [record[key] for record in records if key in record]


# --------------------------------------------------------------------------- tool calls


def test_every_shipped_template_that_takes_tool_calls_reads_them_back():
    """A template that trains tool calls declares its format, and the format reads the call
    the template renders (name and arguments); the conformance kit holds third-party ones."""
    from modelloop.testing.kit import Skip
    from modelloop.testing.templates import reads_tool_calls, trains_tool_calls

    with_calls = []
    for template in get_registry(TEMPLATES):
        try:
            trains_tool_calls(template, None)
        except Skip:
            continue
        with_calls.append(template.name)
        assert template.tool_calls is not None, f"{template.name} renders tool calls and declares no format"
        reads_tool_calls(template, None)
    assert {"chatml", "qwen2", "qwen3", "llama3", "deepseek_v3", "deepseek_v3.1", "glm4", "chatglm4", "harmony"} <= set(
        with_calls
    )


def test_a_malformed_call_is_read_as_one_the_environment_can_answer():
    from modelloop.builtin.templates import HERMES_TOOL_CALLS

    calls = HERMES_TOOL_CALLS.parse('<tool_call>\n{"name": "calculator", "arguments": {"expression": 1+}\n</tool_call>')
    assert len(calls) == 1 and calls[0].arguments is None and "not JSON" in calls[0].error
    assert HERMES_TOOL_CALLS.parse("The answer is 42.") == ()


def test_the_calculator_computes_arithmetic_and_nothing_else():
    assert calculate("(12 + 30) * 7") == 294
    assert calculate("7 / 2") == 3.5 and calculate("8 / 2") == 4
    for bad in ("__import__('os')", "2 ** 1000", "x + 1", "1 +"):
        with pytest.raises(ValueError):
            calculate(bad)


def test_the_quiz_asks_every_completion_of_a_group_the_same_questions():
    record = {"prompt": [{"role": "user", "content": "What is 2+3?"}], "solution": "5"}
    first, second = start_quiz(record, rounds=3), start_quiz(record, rounds=3)
    steps = [first.step(Turn(text="5")), first.step(Turn(text="no idea")), first.step(Turn(text="0"))]
    assert [step.done for step in steps] == [False, False, True]
    assert steps[0].reward == pytest.approx(1 / 3) and steps[1].reward == 0.0
    assert second.step(Turn(text="5")).observation == steps[0].observation  # the same next question


# --------------------------------------------------------------------------- the episode loop


@pytest.fixture(scope="module")
def qwen2_chat(tiny_models):
    from modelloop.chat import resolve_chat_format
    from modelloop.models.loading import load_tokenizer, read_config, resolve_family

    tokenizer = load_tokenizer(str(tiny_models("qwen2")))
    return tokenizer, resolve_chat_format(tokenizer, resolve_family(read_config(str(tiny_models("qwen2"))).model_type))


QUESTION = [{"role": "user", "content": "What is 6*7?"}]
CALL = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "6*7"}}}


class ScriptedSession:
    """An engine that answers each round of requests from a script: token ids as a model
    trained on the template would generate them (the call exactly as the template writes it)."""

    def __init__(self, tokenizer, chat, rounds):
        self.tokenizer, self.rounds, self.requests = tokenizer, list(rounds), []
        self.end = tokenizer.convert_tokens_to_ids(chat.end_of_turn[0])

    def ids(self, text):
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + (self.end,)

    def generate(self, requests):
        from modelloop.inference.types import Completion, Generation

        self.requests.append(requests)
        texts = self.rounds.pop(0)
        return [
            Generation(
                choices=tuple(
                    Completion(text=text, token_ids=self.ids(text), finish_reason="stop")
                    for text in texts[index : index + request.params.n]
                ),
                prompt_tokens=len(request.prompt),
            )
            for index, request in enumerate(requests)
        ]


def rollouts_over(session, tokenizer, chat, environment="calculator", records=None):
    from modelloop.inference.types import SamplingParams
    from modelloop.specs import Engine
    from modelloop.stages.episodes import Episodes
    from modelloop.stages.rollouts import EngineRollouts

    records = records or [{"prompt": QUESTION, "solution": "42"}]
    return EngineRollouts(
        Engine(name="scripted", start=lambda *a, **k: None, attach=lambda *a, **k: session),
        tokenizer=tokenizer,
        chat=chat,
        sampling=SamplingParams(max_tokens=48),
        base_model="",
        tuner=FULL,
        sync_dir=None,
        episodes=Episodes(bind_environment(environment, {}), records, tokenizer=tokenizer, chat=chat),
    )


def call_text(chat):
    """The tool call as the template renders it for the assistant."""
    messages = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [CALL]}]
    pieces = chat.segments(messages, [CALCULATOR_TOOL])
    return next(text for text, trained in pieces if trained).removesuffix(chat.end_of_turn[0])


ATTACHED = type(
    "Trainer", (), {"model": None, "accelerator": type("A", (), {"unwrap_model": staticmethod(lambda m: m)})()}
)()


def test_an_episode_keeps_the_generated_ids_and_masks_the_tool_result(qwen2_chat):
    tokenizer, chat = qwen2_chat
    session = ScriptedSession(tokenizer, chat, [[call_text(chat), "41"], ["42"]])
    out = rollouts_over(session, tokenizer, chat)([QUESTION, QUESTION], ATTACHED)

    first, then = session.requests
    assert [request.params.n for request in first] == [2]  # the group's first turns: one request
    prompt = first[0].prompt
    assert tokenizer.decode(prompt) == chat.render(QUESTION, add_generation_prompt=True, tools=[CALCULATOR_TOOL])
    call, answer, wrong = session.ids(call_text(chat)), session.ids("42"), session.ids("41")
    observation = out["completion_ids"][0][len(call) : -len(answer)]
    # the next turn continues the very ids the engine gave, then the tool's result
    assert [request.prompt for request in then] == [list(prompt) + list(call) + observation]
    assert out["completion_ids"] == [list(call) + observation + list(answer), list(wrong)]
    assert out["env_mask"] == [[1] * len(call) + [0] * len(observation) + [1] * len(answer), [1] * len(wrong)]
    # what the model read is the conversation as the template renders it, the calculator's answer in it
    whole = tokenizer.decode(prompt + out["completion_ids"][0])
    conversation = [
        *QUESTION,
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "42"},
    ]
    assert whole + "\n" == chat.render(conversation, add_generation_prompt=False, tools=[CALCULATOR_TOOL])
    assert out[ENVIRONMENT_REWARD] == [1.0, 0.0]
    assert out["prompt_ids"] == [prompt, prompt] and out["logprobs"] is None


def test_an_episode_stops_at_its_turn_limit(qwen2_chat):
    tokenizer, chat = qwen2_chat
    call = call_text(chat)
    session = ScriptedSession(tokenizer, chat, [[call, call], [call, call], [call, call], [call, call]])
    out = rollouts_over(session, tokenizer, chat)([QUESTION, QUESTION], ATTACHED)
    assert len(session.requests) == 4  # the calculator's four turns, the last one a call left unanswered
    assert all(mask[-1] == 1 for mask in out["env_mask"])  # a completion ends with the model's own turn
    assert out[ENVIRONMENT_REWARD] == [0.0, 0.0]


def test_observation_tokens_get_no_gradient(qwen2_chat, tiny_models, tmp_path):
    """TRL's GRPO loss, on an episode from the rollouts: d loss / d log p is zero at every
    token of the tool's result and not at the model's own tokens."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    tokenizer, chat = qwen2_chat
    session = ScriptedSession(tokenizer, chat, [[call_text(chat), "41"], ["42"]])
    records = [{"prompt": QUESTION, "solution": "42"}]
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_models("qwen2")),
        reward_funcs=[environment_reward],
        args=GRPOConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            num_generations=2,
            max_completion_length=48,
            max_steps=1,
            beta=0.0,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
        ),
        train_dataset=Dataset.from_list(records * 2),
        processing_class=tokenizer,
        rollout_func=rollouts_over(session, tokenizer, chat, records=records),
    )
    gradients = []
    per_token_logps = trainer._get_per_token_logps_and_entropies

    def keeping_gradients(*args, **kwargs):
        logps, *rest = per_token_logps(*args, **kwargs)
        if logps.requires_grad:
            logps.register_hook(lambda gradient: gradients.append(gradient.detach().clone()))
        return (logps, *rest)

    trainer._get_per_token_logps_and_entropies = keeping_gradients
    trainer.train()

    call, answer = len(session.ids(call_text(chat))), len(session.ids("42"))
    (gradient,) = gradients
    episode = next(row for row in gradient if row.abs().sum() > 0 and (row[call:] != 0).any())
    observation = episode[call : episode.nonzero().max() + 1 - answer]
    assert len(observation) > 0 and torch.all(observation == 0)
    assert torch.all(episode[:call] != 0) and torch.all(episode[call + len(observation) :][:answer] != 0)


# --------------------------------------------------------------------------- plugins and checks


QUIZ_STEPS: list[Turn] = []


def say_a_word(record, *, word="yes"):
    class Episode:
        def step(self, turn):
            QUIZ_STEPS.append(turn)
            if turn.number == 2:
                return Step(reward=float(word in turn.text), done=True)
            return Step(observation=({"role": "user", "content": f"Say {word}."},), reward=0.5)

    return Episode()


def test_hook_register_environments_an_environment_from_a_plugin_plays_two_turns(tiny_models, tmp_path):
    class Words:
        @hookimpl
        def register_environments(self, register):
            register(Environment(name="words", description="say the word", start=say_a_word))

    get_plugin_manager().add_plugin(Words(), PluginInfo("words", "1.0", builtin=False))
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Count to {n}."} for n in range(4)])
    QUIZ_STEPS.clear()
    modelloop.rlhf(
        {
            "model": str(tiny_models("qwen2")),
            "method": "grpo",
            "data": [data],
            "environment": "words",
            "environment_options": {"word": "no"},
            "rewards": ["length"],
            "reward_weights": [0.5],
            "num_generations": 2,
            "batch_size": 4,
            "max_completion_length": 6,
            "max_steps": 2,
            "logging_steps": 1,
            "output_dir": str(tmp_path / "run"),
        }
    )
    run = tmp_path / "run"
    assert [turn.number for turn in QUIZ_STEPS[1:]].count(2) == 2 * 4  # every completion's second turn
    rewards = logged(run, "rewards/environment/mean")
    assert len(rewards) == 2 and all(reward >= 0.5 for reward in rewards)
    assert logged(run, "rewards/length/mean")
    # the run keeps the weights as given (a resumed run reads them again); TRL got 1 before them
    assert json.loads((run / "manifest.json").read_text())["config"]["reward_weights"] == [0.5]


@pytest.mark.parametrize(
    ("arguments", "rows", "message"),
    [
        (["--environment", "chess"], None, "chess"),
        (["--environment", "arithmetic", "--set", "environment_options.turns=3"], None, "unknown option 'turns'"),
        (
            ["--environment", "arithmetic", "--set", "environment_options.rounds=0"],
            None,
            "environment 'arithmetic' failed on record 1 of the data: ValueError: rounds must be 1 or more",
        ),
        (["--environment", "calculator"], [{"prompt": "What is 1+1?"}], "needs a 'solution' column, and record 1"),
        (["--environment", "calculator", "--rollout-engine", "trl"], None, "generates one turn only"),
    ],
)
def test_a_broken_environment_fails_before_the_model_loads_in_one_line(arguments, rows, message, tiny_models, tmp_path):
    from click.testing import CliRunner

    from modelloop.cli import build_cli

    weightless = tmp_path / "weightless"  # loading it would fail: the check must come first
    shutil.copytree(tiny_models("qwen2"), weightless)
    for weights in weightless.glob("*.safetensors"):
        weights.unlink()
    rows = rows or [{"prompt": f"What is {n}+1?", "solution": str(n + 1)} for n in range(4)]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    result = CliRunner().invoke(
        build_cli(), ["rlhf", "--method", "grpo", "--model", str(weightless), "--data", data, *arguments]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_two_records_with_one_prompt_and_other_columns_are_refused():
    from modelloop.stages.episodes import records_by_prompt

    same = {"prompt": QUESTION, "solution": "42"}
    assert len(records_by_prompt("calculator", [same, dict(same)])) == 1
    with pytest.raises(EnvironmentFailure, match="record 2 has the prompt of an earlier record"):
        records_by_prompt("calculator", [same, {**same, "solution": "41"}])


def test_a_turn_cut_at_the_length_limit_is_closed_for_the_next_one(qwen2_chat):
    """The quiz goes on after an answer cut short: the end of turn the model did not write
    comes before the next question, masked with it."""
    from modelloop.inference.types import Completion, Generation

    tokenizer, chat = qwen2_chat

    class Cut(ScriptedSession):
        def generate(self, requests):
            self.requests.append(requests)
            ids = tuple(self.tokenizer("5", add_special_tokens=False)["input_ids"])
            choice = Completion(text="5", token_ids=ids, finish_reason="length")
            return [Generation(choices=(choice,) * request.params.n, prompt_tokens=1) for request in requests]

    session = Cut(tokenizer, chat, [])
    record = {"prompt": [{"role": "user", "content": "What is 2+3?"}], "solution": "5"}
    out = rollouts_over(session, tokenizer, chat, "arithmetic", [record])([record["prompt"]], ATTACHED)
    assert len(session.requests) == 3  # the quiz's three rounds
    answer = list(session.ids("5")[:-1])
    first_gap = out["completion_ids"][0][len(answer) :]
    assert tokenizer.decode(first_gap).startswith(chat.end_of_turn[0])
    assert out["env_mask"][0][: len(answer) + 1] == [1] * len(answer) + [0]


def test_an_environment_that_answers_a_turn_with_no_step_is_named():
    from modelloop.environments import check_environment

    def broken(record):
        class Episode:
            def step(self, turn):
                return {"reward": 1}

        return Episode()

    from modelloop.environments import BoundEnvironment

    bound = BoundEnvironment(Environment(name="broken", start=broken), {}, 2)
    with pytest.raises(EnvironmentFailure, match="step returned a dict, not a Step"):
        check_environment(bound, [{"prompt": "hi"}])


# --------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def calculator_student(tiny_models, tmp_path_factory):
    """The tiny model after a short SFT on calculator transcripts (call the tool with the
    question's product, answer with its result): it has the format, and copies the numbers
    right about 45 % of the time (80 steps; 50 leave it right 2 % of the time)."""
    root = tmp_path_factory.mktemp("calculator")
    pairs = [(a, b) for a in range(2, 10) for b in range(2, 10)]
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"What is {a}*{b}?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {"name": "calculator", "arguments": {"expression": f"{a}*{b}"}},
                        }
                    ],
                },
                {"role": "tool", "content": str(a * b)},
                {"role": "assistant", "content": str(a * b)},
            ],
            "tools": [CALCULATOR_TOOL],
        }
        for a, b in pairs
    ]
    modelloop.sft(
        {
            "model": str(tiny_models("qwen2")),
            "data": [write_jsonl(root / "chats.jsonl", chats)],
            "output_dir": str(root / "sft"),
            "tuner": "full",
            "lr": 1e-3,
            "scheduler": "constant_with_warmup",
            "warmup_ratio": 0.05,
            "max_steps": CALCULATOR_SFT_STEPS,
            "batch_size": 16,
            "max_length": 128,
        }
    )
    prompts = [{"prompt": f"What is {a}*{b}?", "solution": str(a * b)} for a, b in pairs]
    return root / "sft", write_jsonl(root / "prompts.jsonl", prompts)


CALCULATOR_SFT_STEPS = 80


def test_grpo_on_the_calculator_raises_the_mean_reward(calculator_student, tmp_path):
    model, prompts = calculator_student
    modelloop.rlhf(
        {
            "model": str(model),
            "method": "grpo",
            "data": [prompts],
            "environment": "calculator",
            "tuner": "full",
            "num_generations": 8,
            "batch_size": 32,
            "max_completion_length": 64,  # a call is about 50 tokens of the tiny tokenizer
            "lr": 2e-4,
            "max_steps": 30,
            "logging_steps": 1,
            "beta": 0.0,
            "max_length": 512,
            "output_dir": str(tmp_path / "grpo"),
        }
    )
    rewards = logged(tmp_path / "grpo", "rewards/environment/mean")
    first, last = statistics.mean(rewards[:8]), statistics.mean(rewards[-8:])
    assert 0.05 < first < 0.8, rewards
    # 8-step means of 256 episodes near p = 0.5 vary by about 0.03: a rise of 0.06 is twice
    # the noise of the difference (measured: 0.46 -> 0.58 at lr 2e-4; lr 5e-4 collapses)
    assert last > first + 0.06, rewards
    assert logged(tmp_path / "grpo", "completions/mean_length")  # the model's own tokens, not the results


@pytest.mark.parametrize("name", sorted(template.name for template in get_registry(TEMPLATES)))
def test_every_shipped_template_renders_an_episodes_observations(name):
    """The next question of a quiz (and for templates with tool calls, a tool's result) is
    what the template renders after the model's end of turn, through the next generation
    prompt, on the second turn as on the first."""
    from modelloop.stages.episodes import Episodes
    from modelloop.testing.templates import chat_format

    class Text:  # a tokenizer whose ids are the text itself
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text}

    template = get_registry(TEMPLATES).get(name)
    chat = chat_format(template)
    plays = [("arithmetic", {"role": "assistant", "content": "6"}, {"role": "user", "content": "What is 1+1?"})]
    if template.tool_calls is not None:
        plays.append(
            (
                "calculator",
                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "tool", "content": "42"},
            )
        )
    for environment, said, observation in plays:
        episodes = Episodes(bind_environment(environment, {}), [], tokenizer=Text(), chat=chat)
        conversation = [*QUESTION, said, observation]
        seen = episodes.observation_ids(QUESTION, said, [observation])
        assert observation["content"] in seen
        assert chat.render(conversation, add_generation_prompt=True, tools=episodes.tools).endswith(seen)
        second = episodes.observation_ids(conversation, {"role": "assistant", "content": "2"}, [QUESTION[0]])
        assert second.count(QUESTION[0]["content"]) == 1
