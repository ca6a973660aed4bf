"""The ``full`` tuner: train every parameter (``--freeze`` leaves module groups out)."""

from __future__ import annotations

from typing import Any

from modelloop import hookimpl
from modelloop.specs import Tuner


def prepare(model: Any, options: Any, family: Any) -> Any:
    for parameter in model.parameters():
        parameter.requires_grad = True
    return model


FULL = Tuner(name="full", description="train every parameter", prepare=prepare)


@hookimpl
def register_tuners(register):
    register(FULL)
