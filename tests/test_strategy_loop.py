"""A parallel strategy that brings its own training loop (``ParallelStrategy.train``, what
the megatron plugin uses): what the stage hands it, and what it makes of the result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import modelloop
from modelloop.config import ConfigError

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "sums.jsonl"

#: A plain torch loop: SGD on the rows the job hands out, in the sampler's order.
HAND_LOOP = """
from types import SimpleNamespace

import modelloop
from modelloop.parallel.plan import ParallelPlan
from modelloop.specs import ParallelStrategy


def plan(request):
    return ParallelPlan(strategy="handloop", world=request.world, mesh={"dp": 1})


def train(job):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(job.model_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=job.config.lr)
    steps = job.config.max_steps
    state = SimpleNamespace(global_step=0, max_steps=steps, is_world_process_zero=True)
    job.memory.restart()
    job.report.on_train_begin(None, state, None)
    order = list(job.sampler)
    losses = []
    for step in range(1, steps + 1):
        ids, labels = job.data[order[(step - 1) % len(order)]]
        job.collator.tokens += len(ids)
        batch = {"input_ids": torch.as_tensor(ids, dtype=torch.long)[None], "labels": torch.as_tensor(labels, dtype=torch.long)[None]}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        state.global_step = step
        job.report.on_step_end(None, state, None)
        job.report.on_log(None, state, None, logs={"loss": losses[-1]})
    job.report.on_train_end(None, state, None)
    model.save_pretrained(job.run_dir / "model")
    return {"train_loss": sum(losses) / len(losses), **job.memory.measured()}


@modelloop.hookimpl
def register_parallel_strategies(register):
    register(ParallelStrategy(name="handloop", description="a hand-written loop", plan=plan, train=train))
"""


@pytest.fixture
def handloop(install_plugin, monkeypatch):
    dist = install_plugin("modelloop-plugin-handloop", HAND_LOOP)
    monkeypatch.setenv("MODELLOOP_LOAD_PLUGINS", os.environ["MODELLOOP_LOAD_PLUGINS"] + "," + dist)


def settings(model: Path, out: Path, **extra) -> dict:
    return {
        "model": str(model),
        "data": [str(DATA)],
        "strategy": "handloop",
        "max_steps": 4,
        "lr": 0.05,
        "max_length": 64,
        "packing": False,
        "output_dir": str(out),
        **extra,
    }


def test_the_strategys_loop_trains_and_the_stage_completes_the_run(handloop, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = modelloop.sft(settings(tiny_models("qwen2"), tmp_path / "run"))
    run = Path(result["run_dir"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["parallel"]["strategy"] == manifest["parallel"]["wrapped_as"] == "handloop"
    assert manifest["metrics"]["train_tokens_per_second"] > 0  # the tokens the loop took from the job's collator
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in logged] == [1, 2, 3, 4]
    assert (run / "loss.png").is_file()
    trained = AutoModelForCausalLM.from_pretrained(run / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"))
    assert not trained.model.layers[0].mlp.up_proj.weight.equal(base.model.layers[0].mlp.up_proj.weight)
    assert AutoTokenizer.from_pretrained(
        run / "model"
    ).chat_template  # the stage saved the tokenizer beside the weights


def test_a_loop_strategy_starts_from_full_weights_only(handloop, lora_run, tmp_path):
    with pytest.raises(ConfigError, match="handloop strategy starts from full weights.*adapter run"):
        modelloop.sft(settings(lora_run[0], tmp_path / "run"))


def test_rlhf_refuses_a_loop_strategy(handloop, tiny_models, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    with pytest.raises(ConfigError, match="handloop strategy trains with its own loop"):
        modelloop.rlhf(
            {
                "method": "dpo",
                "model": str(tiny_models("qwen2")),
                "data": [str(pairs)],
                "strategy": "handloop",
                "output_dir": str(tmp_path / "dpo"),
            }
        )
