"""Training on several processes: plans, the launcher, strategies against one process.

Every multi-process run here is real: ``modelloop sft --nproc 2`` starts two gloo workers
through torch's elastic agent, exactly as a user's command does. Each is held against a
single process with the same global batch: the same losses step by step, the same
weights at the end, saved as an ordinary folder transformers loads.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelloop.builtin.full_tuner import FULL
from modelloop.parallel.plan import ParallelPlan, PlanError, PlanRequest, make_plan
from modelloop.parallel.world import World, free_port

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data" / "sums.jsonl"
#: every run here: 3 steps of 4 unpacked rows (2 per rank when there are two ranks).
STEPS = 3
SETTINGS = [
    "--data",
    str(DATA),
    "--tuner",
    "full",
    "--max-steps",
    str(STEPS),
    "--logging-steps",
    "1",
    "--no-packing",
    "--max-length",
    "64",
    "--lr",
    "1e-3",
]


def sft(
    model: Path, out: Path, env: dict[str, str], *extra: str, wait: bool = True
) -> subprocess.CompletedProcess | subprocess.Popen:
    argv = [
        sys.executable,
        "-m",
        "modelloop",
        "sft",
        "--model",
        str(model),
        *SETTINGS,
        "--output-dir",
        str(out),
        *extra,
    ]
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def losses(run: Path) -> list[float]:
    return [
        record["loss"]
        for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "loss" in record
    ]


def assert_same_weights(folder: Path, baseline: Path) -> None:
    """Equal up to a tenth of one step's update: AdamW turns float noise in a gradient
    near zero into a step of up to ``lr``, so a few weights may differ by that much."""
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(baseline).state_dict()
    assert trained.keys() == expected.keys()
    for name, tensor in trained.items():
        assert tensor.allclose(expected[name], atol=1e-4), name


@pytest.fixture(scope="module")
def one_process(tiny_models, subprocess_env, tmp_path_factory) -> Path:
    """The baseline: one process, 4 rows per step."""
    out = tmp_path_factory.mktemp("single") / "run"
    done = sft(tiny_models("qwen2"), out, subprocess_env, "--batch-size", "4")
    assert done.returncode == 0, done.stderr
    return out


def request(world: World, model_config, family=None, tuner=FULL, **options) -> PlanRequest:
    return PlanRequest(
        world,
        model_config,
        family,
        tuner,
        options,
        batch_size=2,
        max_length=64,
        gradient_checkpointing=False,
        cuda=False,
    )


# --------------------------------------------------------------------------- the world


def test_world_fills_from_slurm_then_flags_win():
    slurm = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-10],cpu1", "MASTER_PORT": "29511"}
    world = World.resolve(8, environ=slurm)
    assert (world.size, world.node_rank, world.master_addr, world.master_port) == (32, 2, "gpu07", 29511)
    assert World.resolve(8, 2, node_rank=1, master_addr="10.0.0.1", environ=slurm).to_dict()["size"] == 16
    assert (
        World.resolve(8, environ={**slurm, "NODE_RANK": "0"}).node_rank == 0
    )  # --node-rank 0 (exported) beats SLURM's
    assert (
        World.resolve(1, environ={"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "rack[1-2]-n[01-04]-ib"}).master_addr
        == "rack1-n01-ib"
    )
    with pytest.raises(ValueError, match="give --master-addr"):
        World.resolve(1, 2, environ={})
    with pytest.raises(ValueError, match="node rank 5"):
        World(nproc=1, nnodes=2, node_rank=5)


# --------------------------------------------------------------------------- plans


def test_default_plans_and_their_print(tiny_models):
    from modelloop.models.loading import read_config

    config = read_config(tiny_models("qwen2"))
    strategy, plan = make_plan(None, request(World(), config))
    assert (strategy.name, plan.mesh) == ("single", {"dp": 1})
    strategy, plan = make_plan(None, request(World(nproc=2, master_port=1234), config))
    assert strategy.name == "ddp" and plan.trainer_arguments["ddp_backend"] == "gloo"
    text = "\n".join(plan.lines())
    assert (
        "dp=2" in text
        and "torchrun --nproc-per-node=2 --nnodes=1 --node-rank=0 --master-addr=127.0.0.1 --master-port=1234" in text
    )
    assert json.loads(json.dumps(plan.to_dict()))["world"]["size"] == 2


def test_fsdp_and_tp_plans_follow_the_model(tiny_models):
    from modelloop.models.loading import read_config, resolve_family

    config = read_config(tiny_models("qwen2"))
    family = resolve_family(config.model_type)
    on_gpus = PlanRequest(
        World(nproc=2),
        config,
        family,
        FULL,
        {"offload": True},
        batch_size=2,
        max_length=64,
        gradient_checkpointing=False,
        cuda=True,
    )
    _, fsdp = make_plan("fsdp", on_gpus)
    assert (
        fsdp.wrap == ("Qwen2DecoderLayer",)
        and fsdp.shard == 3
        and fsdp.offload == ("optimizer", "parameters")
        and fsdp.backend == "nccl"
    )
    assert fsdp.trainer_arguments["fsdp"] == "full_shard auto_wrap offload"
    with pytest.raises(PlanError, match="on CPUs they are there already"):
        make_plan("fsdp", request(World(nproc=2), config, family, offload=True))
    _, tp = make_plan("tp", request(World(nproc=2), config, family))
    assert tp.mesh == {"tp": 2} and tp.load_options["distributed_config"] == {
        "tp_plan": "auto",
        "tp_size": 2,
        "fsdp_size": 1,
    }
    _, grid = make_plan("tp", request(World(nproc=8), config, family, size=2))
    assert (grid.mesh, grid.shard, grid.load_options["distributed_config"]["fsdp_size"]) == ({"dp": 4, "tp": 2}, 3, 4)
    with pytest.raises(PlanError, match="size must be at least 2 and divide the 8 processes"):
        make_plan("tp", request(World(nproc=8), config, family, size=3))
    with pytest.raises(PlanError, match="2 key/value heads cannot be split over 4 ranks"):
        make_plan("tp", request(World(nproc=4), config, family))


def test_plans_refuse_what_cannot_work(tiny_models):
    from modelloop.errors import UnknownNameError
    from modelloop.models.loading import read_config

    config = read_config(tiny_models("qwen2"))
    with pytest.raises(PlanError, match="single runs one process"):
        make_plan("single", request(World(nproc=2), config))
    with pytest.raises(PlanError, match="tp strategy needs at least 2 processes"):
        make_plan("tp", request(World(), config))
    with pytest.raises(PlanError, match="unknown option 'bucket'"):
        make_plan("ddp", request(World(nproc=2), config, bucket=5))
    with pytest.raises(UnknownNameError, match="fdsp"):
        make_plan("fdsp", request(World(nproc=2), config))


def test_strategies_ask_the_tuner_what_it_trains_not_its_name(tiny_models):
    """tp splits every layer and trains all of it: any tuner that trains every weight
    (GaLore too) may use it, adapters may not; FSDP's own checkpointing refuses adapters."""
    from modelloop.models.loading import read_config
    from modelloop.specs import Tuner

    config, family = read_config(tiny_models("qwen2")), None
    every_weight = Tuner(name="my-full", prepare=lambda model, options, family: model, trains_all_weights=True)
    adapter = Tuner(name="my-adapter", prepare=lambda model, options, family: model, adapter=True)
    _, tp = make_plan("tp", request(World(nproc=2), config, family, tuner=every_weight))
    assert tp.mesh == {"tp": 2}
    with pytest.raises(PlanError, match="tuner 'my-adapter' trains only some"):
        make_plan("tp", request(World(nproc=2), config, family, tuner=adapter))
    with pytest.raises(PlanError, match="checkpointing renames the modules an adapter is saved by"):
        make_plan("fsdp", request(World(nproc=2), config, family, tuner=adapter, activation_checkpointing=True))
    _, fsdp = make_plan(
        "fsdp", request(World(nproc=2), config, family, tuner=every_weight, activation_checkpointing=True)
    )
    assert fsdp.activation_checkpointing
    with pytest.raises(PlanError, match="needs 4 processes, the world has 2"):
        ParallelPlan(strategy="x", world=World(nproc=2), mesh={"dp": 2, "tp": 2})


# --------------------------------------------------------------------------- real runs


def test_ddp_matches_one_process_and_saves_a_plain_model(tiny_models, subprocess_env, one_process, tmp_path):
    out = tmp_path / "ddp"
    done = sft(tiny_models("qwen2"), out, subprocess_env, "--batch-size", "2", "--nproc", "2")
    assert done.returncode == 0, done.stderr
    assert losses(out) == pytest.approx(losses(one_process), rel=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["status"] == "completed"
        and manifest["parallel"]["strategy"] == "ddp"
        and manifest["parallel"]["world"]["size"] == 2
    )
    assert "plan: mesh" in done.stdout and "dp=2" in done.stdout
    assert_same_weights(out / "model", one_process / "model")
    assert sorted(path.name for path in (out / "logs" / "node0").glob("*/attempt_0/*")) == ["0", "1"]
    # each rank owns its process as the command does: DeepSpeed, which ddp does not use,
    # stays out, and with it its start-up notice
    output = (done.stdout + done.stderr).splitlines()
    assert [line for line in output if not re.match(r"(\[rank\d+\]:)?(modelloop: |train )", line)] == []


@pytest.mark.parametrize(
    ("strategy", "options", "batch", "wrapped_as"),
    [
        ("fsdp", [], 2, "FSDPQwen2ForCausalLM"),
        ("deepspeed", ["--set", "strategy_options.stage=2"], 2, "DeepSpeedEngine"),
        ("deepspeed", ["--set", "strategy_options.stage=3"], 2, "DeepSpeedEngine"),
        ("deepspeed", ["--set", "strategy_options.offload_optimizer=true"], 2, "DeepSpeedEngine"),
        ("tp", [], 4, "Qwen2ForCausalLM"),  # every rank reads the whole batch and holds half of each layer
    ],
    ids=["fsdp", "zero2", "zero3", "zero2-offload", "tp"],
)
def test_sharded_strategies_match_one_process(
    tiny_models, subprocess_env, session_cache, one_process, tmp_path, strategy, options, batch, wrapped_as
):
    out = tmp_path / strategy
    done = sft(
        tiny_models("qwen2"),
        out,
        subprocess_env,
        "--batch-size",
        str(batch),
        "--nproc",
        "2",
        "--strategy",
        strategy,
        *options,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(one_process), rel=1e-5)
    parallel = json.loads((out / "manifest.json").read_text())["parallel"]
    assert parallel["wrapped_as"] == wrapped_as  # what really ran, not what was asked for
    assert sorted(path.name for path in (out / "model").glob("*.safetensors")) == ["model.safetensors"]
    assert_same_weights(out / "model", one_process / "model")
    # DeepSpeed's shared-memory all-reduce serves its inference only: not compiled for training
    assert not (session_cache / "torch_extensions" / "deepspeed_shm_comm").exists()


def test_fsdp_with_tp_on_a_2d_mesh_matches_one_process(tiny_models, subprocess_env, one_process, tmp_path):
    """4 ranks: layers split over 2 (tp), the model sharded over the other 2 (dp), each
    dp rank reading 2 of the 4 rows of a step."""
    out = tmp_path / "2d"
    done = sft(
        tiny_models("qwen2"),
        out,
        subprocess_env,
        "--batch-size",
        "2",
        "--nproc",
        "4",
        "--strategy",
        "tp",
        "--set",
        "strategy_options.size=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(one_process), rel=1e-5)
    parallel = json.loads((out / "manifest.json").read_text())["parallel"]
    assert (parallel["mesh"], parallel["shard"], parallel["wrapped_as"]) == (
        {"dp": 2, "tp": 2},
        3,
        "FSDPQwen2ForCausalLM",
    )
    assert sorted(path.name for path in (out / "model").iterdir() if path.suffix in (".safetensors", ".bin")) == [
        "model.safetensors"
    ]
    assert_same_weights(out / "model", one_process / "model")


def test_ulysses_sequence_parallel_matches_one_process(tiny_models, subprocess_env, tmp_path):
    """Two ranks split each row's tokens (DeepSpeed's Ulysses): both see the same 2 rows,
    so one process with those 2 rows is the baseline."""
    single = sft(tiny_models("qwen2"), tmp_path / "single", subprocess_env, "--batch-size", "2")
    split = sft(
        tiny_models("qwen2"),
        tmp_path / "split",
        subprocess_env,
        "--batch-size",
        "2",
        "--nproc",
        "2",
        "--strategy",
        "deepspeed",
        "--sequence-parallel",
        "2",
    )
    assert single.returncode == 0 and split.returncode == 0, split.stderr[-3000:]
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert json.loads((tmp_path / "split" / "manifest.json").read_text())["parallel"]["mesh"] == {"dp": 1, "cp": 2}


def test_sequence_parallel_is_refused_where_it_cannot_run(tiny_models):
    from modelloop.models.loading import read_config

    config = read_config(tiny_models("qwen2"))
    split = PlanRequest(
        World(nproc=2),
        config,
        None,
        FULL,
        {},
        batch_size=2,
        max_length=64,
        gradient_checkpointing=False,
        cuda=False,
        sequence_parallel=2,
    )
    with pytest.raises(PlanError, match="the ddp strategy does not split sequences"):
        make_plan("ddp", split)
    with pytest.raises(PlanError, match="ring attention.*CUDA GPUs only"):
        make_plan("fsdp", split)
    on_gpus = PlanRequest(
        World(nproc=4),
        config,
        None,
        FULL,
        {},
        batch_size=2,
        max_length=64,
        gradient_checkpointing=False,
        cuda=True,
        sequence_parallel=2,
    )
    _, plan = make_plan("fsdp", on_gpus)
    assert plan.mesh == {"dp": 2, "cp": 2} and plan.environment["PARALLELISM_CONFIG_CP_SIZE"] == "2"
    with pytest.raises(PlanError, match="does not divide the 4 processes"):
        make_plan(
            "fsdp",
            PlanRequest(
                World(nproc=4),
                config,
                None,
                FULL,
                {},
                batch_size=2,
                max_length=64,
                gradient_checkpointing=False,
                cuda=True,
                sequence_parallel=3,
            ),
        )


def gpus() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.skipif(gpus() < 2, reason="needs 2 CUDA GPUs (NCCL, torch's ring attention)")
@pytest.mark.parametrize(
    ("strategy", "extra"),
    [("ddp", []), ("fsdp", []), ("fsdp", ["--sequence-parallel", "2", "--max-length", "64"])],
    ids=["ddp", "fsdp", "fsdp-context-parallel"],
)
def test_on_gpus_with_nccl(tiny_models, subprocess_env, tmp_path, strategy, extra):
    out = tmp_path / "run"
    done = sft(
        tiny_models("qwen2"), out, subprocess_env, "--batch-size", "2", "--nproc", "2", "--strategy", strategy, *extra
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parallel = json.loads((out / "manifest.json").read_text())["parallel"]
    assert parallel["backend"] == "nccl" and losses(out)[-1] < losses(out)[0]


def test_alignment_runs_on_two_processes_too(tiny_models, subprocess_env, tmp_path):
    out = tmp_path / "dpo"
    argv = [
        sys.executable,
        "-m",
        "modelloop",
        "rlhf",
        "--method",
        "dpo",
        "--model",
        str(tiny_models("qwen2")),
        "--data",
        str(REPO / "examples" / "data" / "preference.jsonl"),
    ]
    argv += [
        "--tuner",
        "lora",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "64",
        "--nproc",
        "2",
        "--output-dir",
        str(out),
    ]
    done = subprocess.run(argv, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["parallel"]["wrapped_as"] == "DistributedDataParallel"
    assert (out / "model" / "adapter_model.safetensors").is_file()


def test_two_nodes_on_loopback_train_together(tiny_models, subprocess_env, one_process, tmp_path):
    out, port = tmp_path / "nodes", str(free_port())
    nodes = [
        sft(
            tiny_models("qwen2"),
            out,
            subprocess_env,
            "--batch-size",
            "2",
            "--nproc",
            "1",
            "--nnodes",
            "2",
            "--node-rank",
            str(rank),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            port,
            wait=False,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr
    assert losses(out) == pytest.approx(losses(one_process), rel=1e-5)
    assert json.loads((out / "manifest.json").read_text())["parallel"]["world"] == {
        "nproc": 1, "nnodes": 2, "node_rank": 0, "master_addr": "127.0.0.1", "master_port": int(port), "size": 2
    }  # fmt: skip


def test_a_killed_rank_ends_the_job_with_its_name_and_resume_finishes_it(tiny_models, subprocess_env, tmp_path):
    import psutil

    out = tmp_path / "killed"
    job = sft(
        tiny_models("qwen2"),
        out,
        subprocess_env,
        "--batch-size",
        "2",
        "--nproc",
        "2",
        "--max-steps",
        "100000",
        "--save-steps",
        "1",
        wait=False,
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "checkpoint-1").is_dir():  # every rank trains and has saved once
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1]
        time.sleep(0.5)
    rank_1 = next(
        child for child in psutil.Process(job.pid).children(recursive=True) if child.environ().get("RANK") == "1"
    )
    rank_1.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = job.communicate(timeout=120)
    assert time.monotonic() - killed < 60
    assert job.returncode == 2
    headline = next(line for line in stderr.splitlines() if line.startswith("Error: "))
    # rank 0 either notices the lost peer itself or is stopped by the agent: either way it is named
    assert headline in (
        "Error: rank 1 (local rank 1) was killed by SIGKILL; rank 0 failed after it",
        "Error: rank 1 (local rank 1) was killed by SIGKILL; rank 0 was still running and stopped (a rank that hangs makes the others time out)",
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "rank 1" in manifest["error"]

    saved = max(int(path.name.rsplit("-", 1)[1]) for path in (out / "checkpoints").glob("checkpoint-*"))
    resumed = sft(tiny_models("qwen2"), out, subprocess_env, "--resume", str(out), "--max-steps", str(saved + 2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["status"] == "completed"
    steps = [
        record["step"]
        for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "loss" in record
    ]
    assert steps == list(range(1, saved + 3))  # each step logged once, across the two attempts


def test_a_worker_the_agent_stopped_is_not_named_first(tmp_path):
    """elastic stamps failures to the second, and a worker killed outright only when it
    collects the failures, after stopping the others: rank 0, stopped with SIGTERM after
    rank 1 was killed, can carry the same time as rank 1, or an earlier one."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from modelloop.parallel.launch import failure_message

    stopped = ProcessFailure(
        local_rank=0, pid=1, exitcode=-signal.SIGTERM, error_file=str(tmp_path / "0" / "error.json")
    )
    killed = ProcessFailure(
        local_rank=1, pid=2, exitcode=-signal.SIGKILL, error_file=str(tmp_path / "1" / "error.json")
    )
    stopped.timestamp = killed.timestamp = 1_700_000_000
    message = failure_message(ChildFailedError("sft", {0: stopped, 1: killed}), range(2))
    assert message == "rank 1 (local rank 1) was killed by SIGKILL; rank 0 failed after it"
    killed.timestamp += 2  # collected after the stop (seen in a real run)
    assert failure_message(ChildFailedError("sft", {0: stopped, 1: killed}), range(2)) == message
    killed.timestamp += 30  # past elastic's grace: the stop came first, the kill was its escalation
    assert failure_message(ChildFailedError("sft", {0: stopped, 1: killed}), range(2)).startswith(
        "rank 0 (local rank 0) was killed by SIGTERM"
    )


SLEEPY_TUNER = """
import os
import time

import modelloop
from modelloop.specs import Tuner


def prepare(model, options, family):
    if os.environ["RANK"] == "1":  # this rank hangs before training; rank 0 waits for it
        time.sleep(3600)
    return model


@modelloop.hookimpl
def register_tuners(register):
    register(Tuner(name="sleepy", prepare=prepare))
"""


def test_a_hung_rank_ends_the_job_after_the_hang_timeout(tiny_models, subprocess_env, install_plugin, tmp_path):
    dist = install_plugin("modelloop-plugin-sleepy", SLEEPY_TUNER)
    env = {
        **subprocess_env,
        "PYTHONPATH": str(install_plugin.site),
        "MODELLOOP_LOAD_PLUGINS": subprocess_env["MODELLOOP_LOAD_PLUGINS"] + "," + dist,
    }
    out = tmp_path / "hung"
    started = time.monotonic()
    done = sft(
        tiny_models("qwen2"),
        out,
        env,
        "--batch-size",
        "2",
        "--nproc",
        "2",
        "--tuner",
        "sleepy",
        "--set",
        "hang_timeout=10",
    )
    assert done.returncode == 2
    assert time.monotonic() - started < 90  # start-up, 10 s of waiting, shut-down
    headline = next(line for line in done.stderr.splitlines() if line.startswith("Error: "))
    assert headline.startswith("Error: rank 0 (local rank 0) stopped with exit code 1; rank 1 ")
    assert "Timed out waiting 10000ms" in done.stderr.split(headline)[1]  # rank 0's own last lines say why
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"


# --------------------------------------------------------------------------- modelloop plan

QWEN_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768, "torch_dtype": "bfloat16",
}  # fmt: skip


def test_plan_says_what_does_not_fit_and_the_cheapest_change(tmp_path):
    from click.testing import CliRunner

    from modelloop.cli import build_cli

    (tmp_path / "config.json").write_text(json.dumps(QWEN_7B))
    plan = [
        "plan",
        "--model",
        str(tmp_path),
        "--tuner",
        "full",
        "--max-length",
        "4096",
        "--batch-size",
        "4",
        "--gpu-memory",
        "80GiB",
    ]
    result = CliRunner().invoke(build_cli(), [*plan, "--nproc", "8", "--no-gradient-checkpointing"])
    assert result.exit_code == 0, result.output
    assert "7,615.6M parameters" in result.output and "nccl" in result.output
    assert "compute        bf16 mixed (trainable weights fp32)" in result.output
    assert "weights         29,051.3 MiB" in result.output  # 7.6 B fp32 master weights, whole on every GPU under ddp
    assert "does not fit" in result.output
    advice = result.output.split("cheapest change that fits")[1]
    assert "--strategy fsdp" in advice and "--gradient-checkpointing" in advice
    sharded = CliRunner().invoke(build_cli(), [*plan, "--nproc", "8", "--strategy", "fsdp", "--gradient-checkpointing"])
    assert "weights          3,631.4 MiB" in sharded.output and sharded.output.rstrip().endswith("fits")
    lora = CliRunner().invoke(
        build_cli(), [*plan, "--tuner", "lora", "--gpu-memory", "20GB", "--no-gradient-checkpointing"]
    )
    assert (
        "M trained (lora)" in lora.output and "--batch-size 2 --grad-accum 2" in lora.output.split("cheapest change")[1]
    )


def test_plan_chooses_the_unset_memory_settings_as_the_stage_does(tmp_path):
    """Unset, gradient checkpointing and the micro-batch come from the plan on a GPU: off
    and as configured when they fit, on and halved (accumulation doubled) when not; a
    setting the user gave is kept."""
    from click.testing import CliRunner

    from modelloop.cli import build_cli
    from modelloop.config import TrainConfig, build_config
    from modelloop.parallel.memory import GIB
    from modelloop.parallel.planner import choose_unset

    (tmp_path / "config.json").write_text(json.dumps(QWEN_7B))
    shape = {"model": str(tmp_path), "data": ["(none)"], "tuner": "lora", "max_length": 4096}
    roomy, said = choose_unset(build_config(TrainConfig, {**shape, "max_length": 1024}), 200 * GIB)
    assert (roomy.gradient_checkpointing, roomy.batch_size, roomy.grad_accum, said) == (
        False,
        8,
        1,
        ["gradient checkpointing off"],
    )
    tight, said = choose_unset(build_config(TrainConfig, shape), 24 * GIB)
    assert tight.gradient_checkpointing and tight.batch_size * tight.grad_accum == 8 and tight.batch_size < 8
    assert said == ["gradient checkpointing on", f"batch {tight.batch_size} x {tight.grad_accum} accumulated"]
    kept, said = choose_unset(build_config(TrainConfig, {**shape, "batch_size": 8}), 24 * GIB)
    assert kept.batch_size == 8 and kept.gradient_checkpointing and said == ["gradient checkpointing on"]
    printed = CliRunner().invoke(
        build_cli(),
        ["plan", "--model", str(tmp_path), "--tuner", "lora", "--max-length", "4096", "--gpu-memory", "24GiB"],
    )
    assert printed.output.startswith(
        f"chosen     gradient checkpointing on, batch {tight.batch_size} x {tight.grad_accum} accumulated"
    )
    assert printed.output.rstrip().endswith("fits")


@pytest.fixture(scope="module")
def long_texts(tmp_path_factory) -> Path:
    """64 text records of 400 words: rows that fill ``max_length`` for pre-training."""
    import random

    generator = random.Random(0)
    words = "the a of to and in is it that for on with as was at by an be this from".split()
    records = [
        {"text": " ".join(f"{generator.choice(words)}{generator.randint(0, 99)}" for _ in range(400))}
        for _ in range(64)
    ]
    path = tmp_path_factory.mktemp("texts") / "text.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.mark.parametrize(
    ("nproc", "checkpointing"),
    [(1, False), (1, True), (2, False)],
    ids=["one-process", "one-process-checkpointing", "ddp"],
)
def test_the_memory_estimate_is_within_a_quarter_of_the_measured_peak(
    tiny_models, long_texts, subprocess_env, tmp_path, nproc, checkpointing
):
    from modelloop.config import TrainConfig, build_config
    from modelloop.parallel.memory import MIB
    from modelloop.parallel.planner import plan_memory

    model, text = tiny_models("qwen2", "small"), long_texts  # 24 M parameters: tensors, not libraries, fill the memory
    shape = {
        "model": str(model),
        "data": [str(text)],
        "tuner": "full",
        "batch_size": 4 // nproc,
        "max_length": 256,
        "max_steps": 3,
        "nproc": nproc,
    }
    argv = [
        sys.executable,
        "-m",
        "modelloop",
        "pt",
        "--output-dir",
        str(tmp_path / "run"),
        "--gradient-checkpointing" if checkpointing else "--no-gradient-checkpointing",
    ]
    argv += [f"--{key.replace('_', '-')}={value}" for key, value in shape.items() if key != "data"] + [
        "--data",
        str(text),
    ]
    done = subprocess.run(argv, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    measured = json.loads((tmp_path / "run" / "manifest.json").read_text())["metrics"]["peak_memory_mib"]  # rank 0's
    config = build_config(TrainConfig, {**shape, "gradient_checkpointing": checkpointing})
    estimated = plan_memory(config, cuda=False).estimate.total / MIB
    assert 0.75 <= estimated / measured <= 1.25, f"estimated {estimated:.0f} MiB, measured {measured:.0f} MiB"
