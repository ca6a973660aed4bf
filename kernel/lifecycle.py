"""The lifecycle of a stage, as the hooks ``before_stage``, ``on_log``, ``after_stage`` and
``on_stage_error`` see it.

Every stage runs inside ``stage_lifecycle``, so trackers and notifiers written as
plugins see every stage the same way, whether it trains, exports or serves.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelloop.plugins import PluginManager, get_plugin_manager


@dataclass
class StageContext:
    """What a running stage reports through: its metrics and, at the end, its result."""

    stage: str
    config: Mapping[str, Any]
    run_dir: Path
    manager: PluginManager
    result: dict[str, Any] = field(default_factory=dict)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Hand one step's metrics to every ``on_log`` implementation."""
        self.manager.hook.on_log(stage=self.stage, step=step, metrics=dict(metrics), run_dir=self.run_dir)


@contextmanager
def stage_lifecycle(
    stage: str, config: Mapping[str, Any], run_dir: Path, manager: PluginManager | None = None
) -> Iterator[StageContext]:
    """Fire ``before_stage`` now, then ``after_stage`` with ``context.result`` on success or
    ``on_stage_error`` with the exception (which is re-raised) on failure."""
    manager = manager or get_plugin_manager()
    manager.hook.before_stage(stage=stage, config=config, run_dir=run_dir)
    context = StageContext(stage, config, run_dir, manager)
    try:
        yield context
    except BaseException as error:
        manager.hook.on_stage_error(stage=stage, config=config, run_dir=run_dir, error=error)
        raise
    manager.hook.after_stage(stage=stage, config=config, run_dir=run_dir, result=context.result)
