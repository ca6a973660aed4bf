"""Parallel strategies: ``plan`` of a trivial request (one process, or the fewest the
strategy takes; the full tuner) returns a ``ParallelPlan``, through the kernel's own
checks (``make_plan``); and a real ``modelloop sft`` step runs on two processes with the
strategy (gloo on a CPU), ending in a completed run.

The step starts new processes, which load installed plugins only: a strategy whose
module no installed distribution holds, one whose plan refuses two processes
(``single``), one that runs on CUDA GPUs only on a machine without one, and one whose
libraries are missing are skipped with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from modelloop.specs import ParallelStrategy
from modelloop.testing.kit import Broken, Check, Skip, require
from modelloop.testing.samples import CONVERSATIONS, reference
from modelloop.testing.workspace import Workspace

#: The most a step may take: DeepSpeed compiles its CPU ops on first use (minutes).
STEP_TIMEOUT = 900


def checks(strategy: ParallelStrategy) -> list[Check]:
    return [
        Check("parallel strategy", strategy, "plan of a trivial request returns a ParallelPlan", plans),
        Check(
            "parallel strategy", strategy, "a training step runs on two processes", steps_on_two_processes, slow=True
        ),
    ]


def plan_for(strategy: ParallelStrategy, workspace: Workspace, processes: int) -> Any:
    """The kernel's plan (``make_plan``) for the reference model on ``processes`` processes.
    A plan is plain data: a strategy that runs on CUDA GPUs only is asked for a GPU
    machine's plan, wherever the kit runs."""
    import torch

    from modelloop.models.loading import read_config
    from modelloop.parallel.plan import PlanRequest, make_plan
    from modelloop.parallel.world import World
    from modelloop.registry import TUNERS, get_registry

    require(strategy, "strategy", gpu=False)
    family, folder = reference(workspace)
    cuda = strategy.needs_cuda or torch.cuda.is_available()
    full = get_registry(TUNERS).get("full")
    request = PlanRequest(
        World(nproc=processes),
        read_config(folder),
        family,
        full,
        {},
        batch_size=2,
        max_length=64,
        gradient_checkpointing=False,
        cuda=cuda,
    )
    return make_plan(strategy.name, request)[1]


def plans(strategy: ParallelStrategy, workspace: Workspace) -> None:
    from modelloop.parallel.plan import PlanError

    try:
        plan_for(strategy, workspace, max(1, strategy.min_world_size))
    except PlanError as error:
        raise Broken(str(error)) from None


def installed(strategy: ParallelStrategy) -> bool:
    """Whether a new process finds the strategy: the kernel's, or an installed distribution's."""
    from importlib import metadata

    top = strategy.plan.__module__.partition(".")[0]
    return top == "modelloop" or top in metadata.packages_distributions()


def steps_on_two_processes(strategy: ParallelStrategy, workspace: Workspace) -> None:
    from modelloop.parallel.plan import PlanError

    require(strategy, "strategy")
    if not installed(strategy):
        raise Skip(
            "the step starts new processes, which load installed plugins only, "
            f"and no installed distribution holds {strategy.plan.__module__}"
        )
    try:
        plan_for(strategy, workspace, 2)
    except PlanError as error:
        raise Skip(f"its plan refuses two processes ({error})") from None
    _, model = reference(workspace)
    data = workspace.folder("step-data") / "conversations.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in CONVERSATIONS), encoding="utf-8")
    out = workspace.folder(f"step-{strategy.name}") / "run"
    flags = {"--model": model, "--data": data, "--tuner": "full", "--strategy": strategy.name, "--nproc": 2}
    flags.update({"--max-steps": 1, "--batch-size": 2, "--max-length": 64, "--output-dir": out})
    command = [sys.executable, "-m", "modelloop", "sft", "--no-packing"]
    argv = command + [str(part) for flag in flags.items() for part in flag]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    if done.returncode != 0:
        raise Broken(f"a step on two processes failed: {last_error(done.stderr)}")
    manifest = json.loads((out / "manifest.json").read_text())
    ran = manifest.get("parallel", {}).get("strategy")
    if manifest.get("status") != "completed" or ran != strategy.name:
        raise Broken(f"a step on two processes left a run {manifest.get('status')!r} with strategy {ran!r}")


def last_error(stderr: str) -> str:
    """The line that says why a command failed: its ``Error:`` line, else its last one."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    return (errors or lines or ["no output"])[-1]
