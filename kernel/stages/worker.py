"""What every process of a multi-process stage runs: ``python -m modelloop.stages.worker
LAUNCH_JSON``.

It runs the stage the launcher ordered, with the launcher's resolved config; torch's
elastic agent has set ``RANK``, ``WORLD_SIZE`` and the rendezvous variables, which the
trainer reads. ``record`` writes an uncaught exception where the launcher finds it. Each
rank owns its process as the ``modelloop`` command does (``modelloop.process``): the
libraries its run does not use stay out (DeepSpeed's start-up notice on a ddp job's
console among them), and it ends without the interpreter's teardown.

It lives with the stages, not with ``parallel/``'s launcher: it is a stage's entry point
on each rank, so it imports the stages, and the parts below them (the launcher among
them) import none. The launcher names it only as the module each process runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from modelloop.parallel.world import leave_process_group


def run(stage: str, config: dict) -> None:
    if stage == "rlhf":
        from modelloop.stages.rlhf import rlhf

        rlhf(config, owns_process=True)
    else:
        from modelloop.stages.train import train

        train(stage, config, owns_process=True)
    leave_process_group()


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    from modelloop.errors import ModelloopError
    from modelloop.log import quiet_library_notices, verbose_requested
    from modelloop.process import end

    if not verbose_requested():
        quiet_library_notices()
    order = json.loads(Path(sys.argv[1]).read_text())
    try:
        record(run)(order["stage"], order["config"])
    except ModelloopError as error:
        print(f"Error: {error}", file=sys.stderr)
        end(2)
    end(0)


if __name__ == "__main__":
    main()
