"""GRPO's asynchronous rollouts (``max_staleness``): generated ahead of the trainer, from
weights at most that many steps old, the engine the worker thread's alone."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

import modelloop
from modelloop import hookimpl
from modelloop.plugins import PluginInfo, get_plugin_manager
from modelloop.stages.async_rollouts import AsyncRollouts
from modelloop.stages.rollouts import EngineRollouts

BATCHES = 8
PROMPTS_A_BATCH = 2


class RecordingRollouts(EngineRollouts):
    """The engine side of the protocol, recorded: which weights were saved and handed over,
    and which batch was generated with which weights (no model, no engine)."""

    def __init__(self, *, fail_on: int | None = None) -> None:
        self.session = SimpleNamespace()  # what the worker generates with
        self.events: list[tuple[str, int]] = []
        self.generated: list[tuple[str, int]] = []  # (first prompt, step of the weights served)
        self.served_step = 0
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def save_policy(self, trainer, step):
        self.events.append(("saved", step))
        return Path(f"/nonexistent/step-{step}")

    def serve(self, folder, step):
        self.served_step = step
        self.events.append(("served", step))
        return self.session

    def rollout(self, prompts, session):
        if self.fail_on is not None and prompts[0] == f"prompt {self.fail_on}.0":
            raise RuntimeError("the engine went away")
        self.generated.append((prompts[0], self.served_step))
        self.events.append(("generated", int(prompts[0].split()[1].split(".")[0])))
        return {"prompt_ids": [[1]] * len(prompts), "completion_ids": [[2]] * len(prompts), "logprobs": None}

    def close(self):
        self.events.append(("closed", -1))


def batch(number):
    return [f"prompt {number}.{row}" for row in range(PROMPTS_A_BATCH)]


def fake_trainer():
    """What the rollouts read of TRL's GRPO trainer: a sampler in order, one generation
    batch a step, the step counter, the metrics TRL logs."""
    dataset = [{"prompt": prompt} for number in range(BATCHES) for prompt in batch(number)]
    return SimpleNamespace(
        train_dataset=dataset,
        _get_train_sampler=lambda data: range(len(data)),
        _train_batch_size=PROMPTS_A_BATCH,
        args=SimpleNamespace(steps_per_generation=1, gradient_accumulation_steps=1),
        num_iterations=1,
        accelerator=SimpleNamespace(num_processes=1, process_index=0),
        state=SimpleNamespace(global_step=0, max_steps=BATCHES),
        model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


def train(rollouts, trainer, numbers, *, learning=lambda number: None):
    """The trainer's loop: each step asks for its batch, learns, and the step counter moves."""
    for number in numbers:
        output = rollouts(batch(number), trainer)
        assert len(output["completion_ids"]) == PROMPTS_A_BATCH
        learning(number)
        trainer.state.global_step += 1


def waiting_for(engine, ahead):
    """A step that learns until batch ``number + ahead`` is generated (10 s at most): the
    worker generates ahead while the trainer learns, or the test fails."""

    def learning(number):
        if number + ahead < BATCHES:
            deadline = time.monotonic() + 10
            while ("generated", number + ahead) not in engine.events and time.monotonic() < deadline:
                time.sleep(0.001)

    return learning


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_each_batch_is_generated_from_weights_at_most_max_staleness_steps_old(staleness):
    engine = RecordingRollouts()
    rollouts = AsyncRollouts(engine, max_staleness=staleness)
    trainer = fake_trainer()
    train(rollouts, trainer, range(BATCHES), learning=waiting_for(engine, staleness))
    rollouts.close()
    assert [prompt for prompt, _ in engine.generated] == [batch(n)[0] for n in range(BATCHES)]  # each batch once
    ages = [number - step for number, (_, step) in enumerate(engine.generated)]
    assert ages == [min(number, staleness) for number in range(BATCHES)]  # generated a step ahead, not further
    assert trainer._metrics["train"]["rollouts/staleness"] == [float(age) for age in ages]
    assert rollouts.ahead_most <= staleness + 1  # the queue is bounded
    if staleness == 0:  # request for request the synchronous run: weights handed over, then the batch
        expected = [event for n in range(BATCHES) for event in (("saved", n), ("served", n), ("generated", n))]
        assert engine.events[:-1] == expected


def test_a_batch_the_plan_did_not_foresee_is_generated_on_demand_and_the_plan_found_again():
    """A resumed run skips batches: the rollouts generate the one asked for, find it in the
    plan, and are ahead again from the next; evaluation batches never touch the plan."""
    engine = RecordingRollouts()
    rollouts = AsyncRollouts(engine, max_staleness=1)
    trainer = fake_trainer()
    train(rollouts, trainer, [0, 4, 5], learning=waiting_for(engine, 1))
    trainer.model.training = False
    assert rollouts(batch(99), trainer)["completion_ids"] == [[2]] * PROMPTS_A_BATCH
    trainer.model.training = True
    train(rollouts, trainer, [6, 7], learning=waiting_for(engine, 1))
    rollouts.close()
    asked = [int(prompt.split()[1].split(".")[0]) for prompt, _ in engine.generated]
    assert asked == [0, 1, 4, 5, 6, 99, 7]  # 1 was generated ahead for nothing; 4 on demand
    assert trainer._metrics["train"]["rollouts/staleness"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert trainer._metrics["eval"]["rollouts/staleness"] == [0.0]  # evaluated with the newest weights


def test_an_engine_failure_reaches_the_trainer_and_the_rollouts_still_close():
    engine = RecordingRollouts(fail_on=2)
    rollouts = AsyncRollouts(engine, max_staleness=1)
    trainer = fake_trainer()
    with pytest.raises(RuntimeError, match="the engine went away"):
        train(rollouts, trainer, range(BATCHES))
    assert trainer.state.global_step == 2
    rollouts.close()
    assert engine.events[-1] == ("closed", -1)


# ---------------------------------------------------------------------- whole runs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def logged(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def from_files(monkeypatch):
    """The hf engine started from the saved policy, in this process (an engine of its own,
    as vLLM's would be, without a server's start-up)."""
    from modelloop.builtin.hf_engine import start
    from modelloop.specs import Engine

    class FromFiles:
        @hookimpl
        def register_engines(self, register):
            register(Engine(name="hf-files", start=start))

    get_plugin_manager().add_plugin(FromFiles(), PluginInfo("hf-files", "1.0", builtin=False))


def grpo(tiny_models, tmp_path, name, **overrides):
    sums = [
        {"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}], "solution": str(a + b)}
        for a in range(6)
        for b in range(6)
    ]
    return {
        "model": str(tiny_models("qwen2")),
        "method": "grpo",
        "data": [write_jsonl(tmp_path / "prompts.jsonl", sums)],
        "rewards": ["length"],
        "reward_options": {"length": {"min_chars": 12, "max_chars": 20}},  # the random model's lengths vary
        "num_generations": 4,
        "batch_size": 8,
        "max_completion_length": 8,
        "lr": 1e-2,
        "max_steps": 3,
        "logging_steps": 1,
        "beta": 0.0,
        "output_dir": str(tmp_path / name),
        **overrides,
    }


#: What differs between two runs that learn the same: time, and the asynchronous rollouts' own.
TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time", "rollouts/")


def test_with_staleness_0_the_run_is_the_synchronous_one(from_files, tiny_models, tmp_path):
    runs = {}
    for name, staleness in (("synchronous", None), ("asynchronous", 0)):
        modelloop.rlhf(grpo(tiny_models, tmp_path, name, rollout_engine="hf-files", max_staleness=staleness))
        runs[name] = [
            {key: value for key, value in row.items() if not key.startswith(TIMING) and "time" not in key}
            for row in logged(tmp_path / name)
        ]
    assert runs["asynchronous"] == runs["synchronous"]
    assert any(row.get("loss") for row in runs["synchronous"])  # the rollouts taught something
    assert [row["rollouts/staleness"] for row in logged(tmp_path / "asynchronous") if "loss" in row] == [0.0] * 3


def test_rollouts_behind_http_run_a_step_ahead_and_are_weighed_by_importance(tiny_models, tmp_path):
    """The built-in engine in its own process (``hf-server``) plays the arithmetic quiz a
    step ahead: the completions of every step after the first come from the weights of the
    step before, and TRL's truncated importance sampling weighs them with the engine's own
    log-probabilities (the quiz's observations, not the model's, carry none)."""
    modelloop.rlhf(
        grpo(
            tiny_models,
            tmp_path,
            "ahead",
            rewards=[],
            environment="arithmetic",
            environment_options={"rounds": 2},
            rollout_engine="hf-server",
            max_staleness=1,
            max_steps=4,
        )
    )
    rows = [row for row in logged(tmp_path / "ahead") if "loss" in row]
    assert [row["rollouts/staleness"] for row in rows] == [0.0, 1.0, 1.0, 1.0]
    ratios = [row["sampling/importance_sampling_ratio/mean"] for row in rows]
    assert all(math.isfinite(ratio) and 0 < ratio <= 3 for ratio in ratios)
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert len(list((tmp_path / "ahead" / "rollout-weights").iterdir())) == 1  # older hand-overs removed


def test_a_stale_tokens_loss_is_weighed_by_the_trained_over_the_sampling_probability(tiny_models, tmp_path):
    """TRL's own GRPO loss, on a batch whose sampler gave the first completion half the
    probability the trained policy gives it: with ``token_truncate`` its tokens weigh 2,
    as if its advantage were doubled; sampled by the trained policy itself, every weight
    is 1 and the loss is the synchronous one. No forward pass is added for the weights."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from modelloop.models.loading import load_tokenizer
    from modelloop.stages.rlhf import off_policy

    arguments = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        report_to=[],
        use_cpu=True,
        beta=0.0,
        vllm_importance_sampling_mode="token_truncate",
    )
    built = {
        name: trainer_class(
            model=str(tiny_models("qwen2")),
            reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
            args=arguments,
            train_dataset=Dataset.from_list([{"prompt": "2+2="}] * 2),
            processing_class=load_tokenizer(str(tiny_models("qwen2"))),
        )
        for name, trainer_class in (("synchronous", GRPOTrainer), ("off-policy", off_policy(GRPOTrainer)))
    }
    built["off-policy"].model.load_state_dict(built["synchronous"].model.state_dict())
    for each in built.values():
        each.model.train()  # as in a training step, which sets the accumulation
        each.current_gradient_accumulation_steps = 1
    prompt, completion = torch.tensor([[5, 6, 7]] * 2), torch.tensor([[8, 9, 10, 11], [12, 13, 14, 0]])
    batch = {
        "prompt_ids": prompt,
        "prompt_mask": torch.ones_like(prompt),
        "completion_ids": completion,
        "completion_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "advantages": torch.tensor([0.5, -0.5]),
        "num_items_in_batch": torch.tensor(7.0),
    }
    trainer = built["off-policy"]
    with torch.no_grad():
        trained, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt, completion], 1), torch.ones(2, 7, dtype=torch.long), 4
        )

    def loss(name, advantages, sampled):
        inputs = {**batch, "advantages": torch.tensor(advantages)}
        if sampled is not None:
            inputs["sampling_per_token_logps"] = sampled
        return built[name]._compute_loss(built[name].model, inputs).item()

    halved = trained.clone()
    halved[0] -= math.log(2)
    assert loss("off-policy", [0.5, -0.5], trained) == pytest.approx(loss("synchronous", [0.5, -0.5], None), abs=1e-6)
    assert loss("off-policy", [0.5, -0.5], halved) == pytest.approx(loss("synchronous", [1.0, -0.5], None), abs=1e-6)
    assert loss("off-policy", [0.5, -0.5], halved) != pytest.approx(loss("synchronous", [0.5, -0.5], None), abs=1e-3)
    assert trainer._metrics["train"]["sampling/importance_sampling_ratio/max"][-1] == pytest.approx(2.0, rel=1e-5)
