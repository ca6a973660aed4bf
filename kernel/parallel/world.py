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
            raise ValueError(
                f"a world needs at least one process on one node, not nproc={self.nproc} nnodes={self.nnodes}"
            )
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
        """The world from the arguments; what they leave out comes from ``NODE_RANK`` /
        ``MASTER_ADDR`` / ``MASTER_PORT`` (where the command line's rendezvous flags put
        them), then SLURM's variables. A single node with no port gets a free one."""
        nnodes = _first(nnodes, _int(environ, "NNODES"), _int(environ, "SLURM_NNODES"), 1)
        node_rank = _first(
            node_rank, _int(environ, "NODE_RANK"), _int(environ, "SLURM_NODEID"), _int(environ, "GROUP_RANK"), 0
        )
        master_addr = master_addr or environ.get("MASTER_ADDR") or _first_host(environ.get("SLURM_JOB_NODELIST", ""))
        if master_addr is None:
            if nnodes > 1:
                raise ValueError("several nodes need the address of node 0: give --master-addr (or run under SLURM)")
            master_addr = "127.0.0.1"
        if master_port is None:
            master_port = _first(_int(environ, "MASTER_PORT"), DEFAULT_PORT if nnodes > 1 else free_port())
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


#: How long ranks wait for each other at the very end, while rank 0 saves, hashes and
#: reports: far longer than a collective may hang, since saving a large model takes time.
FAREWELL_TIMEOUT_S = 6 * 3600

_farewell: Any = None  # the gloo group the ranks leave through (see ``leave_process_group``)


def join_process_group(backend: str, timeout: float) -> None:
    """Join the job's process group with ``timeout`` on every collective, before
    transformers does: for CPU processes it leaves torch's 30-minute default in place
    whatever ``ddp_timeout`` says, and a hung rank would hold the others that long."""
    import datetime

    import torch.distributed

    global _farewell
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    if _farewell is None:
        _farewell = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=FAREWELL_TIMEOUT_S))


def leave_process_group() -> None:
    """Leave together: a rank that exits while rank 0 still writes can take the job (and
    the half-written run) down with it, as DeepSpeed's workers sometimes do at exit."""
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.barrier(group=_farewell)
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "")
    return int(value) if value.isdigit() else None


def _first(*values: Any) -> Any:
    """The first value that is not None (0 counts)."""
    return next(value for value in values if value is not None)


def _first_host(nodelist: str) -> str | None:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``,
    ``rack[1-2]-n[01-04]-ib`` -> ``rack1-n01-ib``."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if not first:
        return None
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first.group(0))
