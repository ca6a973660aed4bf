"""The DeepSpeed config the strategy writes, and what it refuses. (Training through it:
tests/test_parallel.py, against one process.)"""

from __future__ import annotations

import json

import pytest

from modelloop.builtin.full_tuner import FULL
from modelloop.parallel.plan import PlanError, PlanRequest, make_plan
from modelloop.parallel.world import World


def request(cuda: bool = False, **options) -> PlanRequest:
    return PlanRequest(
        World(nproc=2), None, None, FULL, options, batch_size=2, max_length=64, gradient_checkpointing=False, cuda=cuda
    )


def test_zero3_gathers_weights_on_save_and_leaves_batch_sizes_to_the_trainer():
    _, plan = make_plan("deepspeed", request(stage=3))
    config = plan.trainer_arguments["deepspeed"]
    assert (
        config["zero_optimization"]["stage"] == 3
        and config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    )
    assert {
        config[key] for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    } == {"auto"}
    assert (plan.shard, plan.master_weights, plan.mesh) == (3, True, {"dp": 2})
    assert plan.environment["DS_ACCELERATOR"] == "cpu"
    assert "DS_ACCELERATOR" not in make_plan("deepspeed", request(cuda=True))[1].environment


def test_offload_and_a_users_json_merged_over_modelloops(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5e7}, "steps_per_print": 1}))
    _, plan = make_plan(
        "deepspeed", request(cuda=True, stage=3, offload_optimizer=True, offload_parameters=True, config=str(user))
    )
    zero = plan.trainer_arguments["deepspeed"]["zero_optimization"]
    assert (
        zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True} and zero["offload_param"]["device"] == "cpu"
    )
    assert zero["reduce_bucket_size"] == 5e7 and zero["stage"] == 3  # the user's key replaced, the rest kept
    assert plan.trainer_arguments["deepspeed"]["steps_per_print"] == 1
    assert plan.offload == ("optimizer", "parameters")
    # the tuner's optimizer on the host copies
    assert plan.trainer_arguments["deepspeed"]["zero_force_ds_cpu_optimizer"] is False


def test_a_users_json_choosing_stage_3_still_saves_an_ordinary_folder(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}}))
    _, plan = make_plan("deepspeed", request(config=str(user)))
    zero = plan.trainer_arguments["deepspeed"]["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] and plan.shard == 3 and plan.offload == ()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stage": 4}, "stage must be 1, 2 or 3"),
        ({"stage": 2, "offload_parameters": True}, "offload_parameters needs stage 3"),
        ({"stages": 3}, "unknown option 'stages'"),
        ({"config": "/nonexistent/ds.json"}, "no such file"),
    ],
)
def test_bad_options_are_refused_before_anything_starts(options, message):
    with pytest.raises(PlanError, match=message):
        make_plan("deepspeed", request(**options))
