"""The world of a job: processes per node, nodes, and how they meet.

Flags win; where one is left out it is filled from the scheduler's environment (SLURM)
or from torchrun's (``MASTER_ADDR`` and friends), so the same command line works on a
laptop, under ``srun`` and inside a container started by another launcher.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class World:
    """``nproc`` processes on each of ``nnodes`` nodes; this is node ``node_rank``, and
    rank 0 listens on ``master_addr:master_port``."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        if self.nproc < 1 or self.nnodes < 1:
            raise ValueError(f"a world needs at least one process on one node, not nproc={self.nproc} nnodes={self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node rank {self.node_rank} is outside 0..{self.nnodes - 1}")

    @property
    def size(self) -> int:
        return self.nproc * self.nnodes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size": self.size}

    @classmethod
    def resolve(
        cls,
        nproc: int = 1,
        nnodes: int | None = None,
        *,
        node_rank: int | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> World:
        """The world from the flags, with what they leave out taken from SLURM or torchrun
        variables; a single node with no port given gets a free one."""
        nnodes = nnodes or _int(environ, "SLURM_NNODES") or _int(environ, "NNODES") or 1
        if node_rank is None:
            node_rank = _int(environ, "SLURM_NODEID") or _int(environ, "NODE_RANK") or _int(environ, "GROUP_RANK") or 0
        master_addr = master_addr or environ.get("MASTER_ADDR") or _first_host(environ.get("SLURM_JOB_NODELIST", "")) or "127.0.0.1"
        if master_port is None:
            master_port = _int(environ, "MASTER_PORT") or (DEFAULT_PORT if nnodes > 1 else free_port())
        return cls(nproc=nproc, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port)


def torchrun_world(environ: Mapping[str, str] = os.environ) -> World:
    """The world this worker belongs to, as torchrun (ours or the user's) described it."""
    local = int(environ["LOCAL_WORLD_SIZE"])
    return World(
        nproc=local,
        nnodes=int(environ["WORLD_SIZE"]) // local,
        node_rank=int(environ.get("GROUP_RANK", "0")),
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(environ.get("MASTER_PORT", DEFAULT_PORT)),
    )


def rank() -> int:
    """This process's global rank (0 outside a multi-process job)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Whether this process writes the run folder: rank 0, or the only process."""
    return rank() == 0


def in_worker() -> bool:
    """Whether this process was started by torchrun (ours or the user's): it trains
    rather than launches."""
    return "LOCAL_RANK" in os.environ and "LOCAL_WORLD_SIZE" in os.environ


def join_process_group(backend: str, timeout: float) -> None:
    """Join the job's process group with ``timeout`` on every collective, before
    transformers does: for CPU processes it leaves torch's 30-minute default in place
    whatever ``ddp_timeout`` says, and a hung rank would hold the others that long."""
    import datetime

    import torch.distributed

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "")
    return int(value) if value.isdigit() else None


def _first_host(nodelist: str) -> str | None:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist.strip())
    if not match:
        return None
    return match.group(1) + (match.group(2) or "")
