"""Starting a stage on many processes and watching them.

The launcher is the ``modelloop`` process the user started. It has already checked the
config and made the plan; it writes the order this node's workers read (``launch-node<K>.json``: the
stage and its resolved config, pointed at this run folder), starts this node's workers
through torch's elastic agent (what ``torchrun`` runs) and waits. Each rank's output is
kept under ``logs/``; rank 0's is shown as it comes. When a rank dies, the agent stops
the others at once, and when one hangs, the others give up after ``hang_timeout`` in
their next collective; either way the job ends with the rank named and its last lines,
never a silent hang.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from modelloop.artifacts import read_manifest, run_id, update_manifest, write_json_atomic
from modelloop.errors import ModelloopError
from modelloop.parallel.plan import ParallelPlan
from modelloop.threads import available_cpus

#: lines of a failed rank's log shown in the error.
TAIL_LINES = 12
#: set for the workers the launcher starts: the run folder they train into.
LAUNCHED = "MODELLOOP_LAUNCHED_RUN"


class RankFailedError(ModelloopError):
    """A worker process of a multi-process stage died, hung or raised."""


def launch(stage: str, config: Any, plan: ParallelPlan, run_dir: Path) -> dict[str, Any]:
    """Run ``stage`` on this node's share of ``plan.world``; returns the run's result."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    world = plan.world
    logs = run_dir / "logs" / f"node{world.node_rank}"
    logs.mkdir(parents=True, exist_ok=True)
    order = run_dir / f"launch-node{world.node_rank}.json"  # each node's own: paths and resume may differ
    write_json_atomic(order, {"stage": stage, "config": config.model_dump(mode="json")})
    os.environ[LAUNCHED] = str(run_dir)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, available_cpus() // world.nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    launch_config = LaunchConfig(
        min_nodes=world.nnodes,
        max_nodes=world.nnodes,
        nproc_per_node=world.nproc,
        run_id=run_id(run_dir).replace("/", "-"),
        role="rank",
        rdzv_backend="static",
        rdzv_endpoint=f"{world.master_addr}:{world.master_port}",
        rdzv_configs={"rank": world.node_rank, "timeout": config.hang_timeout},
        max_restarts=0,
        logs_specs=DefaultLogsSpecs(
            log_dir=str(logs), redirects=Std.ALL, tee=Std.ALL, local_ranks_filter={0} if world.node_rank == 0 else set()
        ),
    )
    print(f"modelloop: {stage} on {world.size} processes ({plan.strategy}); logs of every rank: {logs}", flush=True)
    try:
        elastic_launch(launch_config, entrypoint=sys.executable)("-m", "modelloop.stages.worker", str(order))
    except ChildFailedError as error:
        message = failure_message(error, range(world.node_rank * world.nproc, (world.node_rank + 1) * world.nproc))
        if world.node_rank == 0 and read_manifest(run_dir).get("status") == "completed":
            # every rank got past saving (it is collective): a worker died on its way out
            print(f"modelloop: warning: the run completed, then {message.splitlines()[0]}", file=sys.stderr)
            return {"run_dir": str(run_dir), "metrics": read_manifest(run_dir).get("metrics", {})}
        _record_failure(run_dir, world.node_rank, message.splitlines()[0])
        raise RankFailedError(message) from None
    except BaseException as error:  # the rendezvous failed, the job was cancelled (scancel, Ctrl-C), ...
        _record_failure(run_dir, world.node_rank, f"{type(error).__name__}: {error}")
        raise
    finally:
        os.environ.pop(LAUNCHED, None)
    manifest = read_manifest(run_dir)
    return {"run_dir": str(run_dir), "metrics": manifest.get("metrics", {})}


def launched_worker() -> bool:
    """Whether this process is a worker modelloop's launcher started (which recorded the
    config as the user gave it), rather than one of a user's own torchrun."""
    return LAUNCHED in os.environ


def _record_failure(run_dir: Path, node_rank: int, reason: str) -> None:
    if node_rank == 0 and read_manifest(run_dir).get("status") != "completed":
        update_manifest(run_dir, status="failed", error=reason)


#: Seconds by which a failure stamped after a worker elastic stopped may still have come first.
STOP_STAMP_SLACK = 10


def failure_message(error: Any, node_ranks: Any) -> str:
    """Which rank failed first, how, which ranks were still running (when one hangs, the
    others are the ones that time out), and the last lines the failed rank wrote."""

    # elastic stops the other workers with SIGTERM, and they stamp their own error files as
    # they stop; a worker killed outright is stamped only when elastic collects the failures,
    # after that: up to a few seconds later. A worker it stopped came first only if the other
    # failed well after (elastic escalates a stop to SIGKILL after a 30 s grace).
    def stamped(item: tuple[int, Any]) -> tuple[float, bool]:
        stopped = item[1].exitcode == -signal.SIGTERM
        return item[1].timestamp + (STOP_STAMP_SLACK if stopped else 0), stopped

    rank, failure = min(error.failures.items(), key=stamped)
    if failure.exitcode < 0:
        how = f"was killed by {signal.Signals(-failure.exitcode).name}"
    else:
        how = f"stopped with exit code {failure.exitcode}"
    headline = f"rank {rank} (local rank {failure.local_rank}) {how}"
    failed_after = sorted(set(error.failures) - {rank})
    if failed_after:
        headline += f"; {_ranks(failed_after)} failed after it"
    running = sorted(set(node_ranks) - set(error.failures))
    if running:
        headline += f"; {_ranks(running)} {'was' if len(running) == 1 else 'were'} still running and stopped (a rank that hangs makes the others time out)"
    lines = [headline]
    tail = last_lines(Path(failure.error_file).parent)
    if tail:
        lines.append(f"its last lines ({Path(failure.error_file).parent}):")
        lines.extend("  " + line for line in tail)
    return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def last_lines(rank_logs: Path, count: int = TAIL_LINES) -> list[str]:
    """The last ``count`` lines a rank wrote: its recorded exception first, else the end
    of its stderr (where tracebacks and warnings go), else of its stdout."""
    error_file = rank_logs / "error.json"
    if error_file.is_file():
        try:
            recorded = json.loads(error_file.read_text())["message"]
            text = recorded.get("message", "") if isinstance(recorded, dict) else str(recorded)
            if text:
                return text.strip().splitlines()[-count:]
        except (ValueError, KeyError):
            pass
    for name in ("stderr.log", "stdout.log"):
        path = rank_logs / name
        if path.is_file():
            text = path.read_text(errors="replace").strip()
            if text:
                return text.splitlines()[-count:]
    return []
