"""CPU thread pools sized to the CPUs this process may use, waiting briefly instead of spinning.

torch sizes its OpenMP pool by the machine's cores, not by a container's CPU quota, and an
OpenMP thread that finishes its share of an operation spins (libgomp: 300,000 rounds, on
the order of a millisecond) waiting for the others. On a machine shared with other work
both go wrong at once: more threads than the CPUs granted, and each waiting thread burns
the time slice that the thread it waits for needs, so every operation runs at the pace of
a descheduled thread. On two cores beside one CPU-bound process an SFT run made 28 % of
its speed alone with libgomp's default spin (``bench/shared_cpu.py``).

``settle_threads`` runs before torch is imported (the command line calls it): the pool is
capped at the CPUs of the affinity mask and the cgroup quota, and a waiting thread spins
3,000 rounds before it sleeps (``GOMP_SPINCOUNT``; ``KMP_BLOCKTIME=0`` for Intel's OpenMP).
On a 2-core Xeon (``bench/shared_cpu.py``, tiny Qwen3 SFT, tokens/s alone and beside one
CPU-bound process): 300 rounds kept 76 % beside but ran 17 % slower alone than 3,000,
and a LoRA DPO step made of many small operations 35 % slower; 3,000 keeps 53 % beside
(libgomp's default, 9 %) and is within a few per cent of libgomp's default alone. Anything
the user set (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) is left as it is.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from modelloop.log import after_import

#: cgroup v2's quota file, then v1's pair (quota and period in microseconds).
CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))

#: Rounds an idle OpenMP thread spins before it sleeps (libgomp's default: 300,000).
SPIN_ROUNDS = 3000


def cgroup_cpus() -> float | None:
    """The CPUs a cgroup quota grants (``1.5`` for 150 ms each 100 ms), or None if unlimited."""
    try:
        quota, period = CGROUP_V2.read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us, period_us = (int(path.read_text()) for path in CGROUP_V1)
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 else None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup quota."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpus()
    return max(1, min(count, math.ceil(quota))) if quota else count


def settle_threads() -> None:
    """Cap torch's pool at the available CPUs and make idle OpenMP threads sleep soon, in
    this process and the ones it starts; effective before torch is imported."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", str(SPIN_ROUNDS))
        os.environ.setdefault("KMP_BLOCKTIME", "0")
    if "OMP_NUM_THREADS" not in os.environ:
        size = available_cpus()
        after_import("torch", lambda torch: torch.set_num_threads(min(size, torch.get_num_threads())))
