"""Runs in EvalScope's own Python: one EvalScope task at a time, as the job file says.

``python modelloop_evalscope_driver.py JOB RESULT``: JOB holds ``tasks`` and the
``TaskConfig`` fields they share; each task's report lands in the work folder. On a
failure RESULT gets ``{"task", "kind", "error"}`` (``kind``: ``unknown``, ``network`` or
``error``) and the exit code is 3, so the plugin can say in one line what stopped.
Nothing of modelloop is imported here: it is not installed in that environment.
"""

from __future__ import annotations

import json
import sys

NETWORK_ERRORS = ("NetworkError", "ConnectionError", "Timeout", "OfflineModeIsEnabled")


def main(job_path: str, result_path: str) -> int:
    with open(job_path, encoding="utf-8") as handle:
        job = json.load(handle)
    from evalscope import TaskConfig, run_task
    from evalscope.api.registry import get_benchmark

    def failed(task: str, kind: str, error: BaseException) -> int:
        message = " ".join(str(error).split()) or type(error).__name__
        with open(result_path, "w", encoding="utf-8") as handle:
            json.dump({"task": task, "kind": kind, "error": message}, handle)
        return 3

    for task in job["tasks"]:
        try:
            get_benchmark(task)
        except ValueError as error:
            return failed(task, "unknown", error)
    for task in job["tasks"]:
        try:
            run_task(TaskConfig(datasets=[task], **job["config"]))
        except Exception as error:  # noqa: BLE001 - reported to the plugin, which tells the user
            names = {cause.__name__ for cause in type(error).__mro__}
            network = any(name.endswith(NETWORK_ERRORS) for name in names)
            return failed(task, "network" if network else "error", error)
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump({"completed": job["tasks"]}, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
