"""The ``full`` tuner: train every parameter (``--freeze`` leaves module groups out)."""

from __future__ import annotations

from typing import Any

from modelloop.hooks import hookimpl
from modelloop.options import complete
from modelloop.specs import Tuner


def check(options: Any) -> dict[str, Any]:
    if "freeze" in options:
        raise ValueError("freeze is a stage setting now: --freeze GROUP (freeze: [...] in a config), with any tuner")
    return complete(options, {})


def prepare(model: Any, options: Any, family: Any) -> Any:
    for parameter in model.parameters():
        parameter.requires_grad = True
    return model


FULL = Tuner(name="full", description="train every parameter", prepare=prepare, check=check, trains_all_weights=True)


@hookimpl
def register_tuners(register):
    register(FULL)
