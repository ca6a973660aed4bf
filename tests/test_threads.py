"""Thread pools sized to the CPUs a process may use, with idle threads that sleep soon."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modelloop import threads


@pytest.mark.parametrize(
    "v2, v1, cpus",
    [
        ("150000 100000\n", None, 1.5),
        ("max 100000\n", None, None),
        (None, ("200000", "100000"), 2.0),
        (None, ("-1", "100000"), None),
        (None, None, None),
    ],
)
def test_the_cgroup_quota_is_read_from_v2_then_v1(v2, v1, cpus, tmp_path, monkeypatch):
    files = {
        "v2": tmp_path / "cpu.max",
        "quota": tmp_path / "cpu.cfs_quota_us",
        "period": tmp_path / "cpu.cfs_period_us",
    }
    if v2 is not None:
        files["v2"].write_text(v2)
    if v1 is not None:
        files["quota"].write_text(v1[0])
        files["period"].write_text(v1[1])
    monkeypatch.setattr(threads, "CGROUP_V2", files["v2"])
    monkeypatch.setattr(threads, "CGROUP_V1", (files["quota"], files["period"]))
    assert threads.cgroup_cpus() == cpus


def test_the_available_cpus_are_the_affinity_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: 1.5)
    assert threads.available_cpus() == 2
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: None)
    assert threads.available_cpus() == 4


SETTLED = """
import json, os
from modelloop import threads
threads.cgroup_cpus = lambda: 1.0  # a container granted one CPU of the machine's two
threads.settle_threads()
import torch
print(json.dumps([torch.get_num_threads(), os.environ.get("GOMP_SPINCOUNT"), os.environ.get("KMP_BLOCKTIME")]))
"""


def settled(env: dict[str, str]) -> list:
    result = subprocess.run([sys.executable, "-c", SETTLED], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_settling_caps_the_pool_and_shortens_the_spin_unless_the_user_chose(subprocess_env):
    env = {
        key: value
        for key, value in subprocess_env.items()
        if key not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    }
    assert settled(env) == [1, "3000", "0"]
    assert settled({**env, "OMP_WAIT_POLICY": "ACTIVE"})[1:] == [None, None]  # the user's policy stands
    assert settled({**env, "OMP_NUM_THREADS": "2"})[0] == 2  # and the user's pool size
