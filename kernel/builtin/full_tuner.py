"""The ``full`` tuner: train every parameter, or all but some module groups.

``tuner_options: {freeze: [vision_tower, embeddings]}`` freezes the named groups of the
model family (``ModelFamily.module_groups``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelloop import hookimpl
from modelloop.options import complete
from modelloop.specs import Tuner

def check(options: Mapping[str, Any]) -> dict[str, Any]:
    options = complete(options, {"freeze": []})
    freeze = options["freeze"]
    if isinstance(freeze, str) or not all(isinstance(group, str) for group in freeze):
        raise ValueError("freeze must be a list of module group names")
    return options


def prepare(model: Any, options: Mapping[str, Any], family: Any) -> Any:
    groups = family.module_groups if family is not None else {}
    unknown = [group for group in options.get("freeze", []) if group not in groups]
    if unknown:
        raise ValueError(f"the {family.name if family else 'model'} family has no module group {unknown[0]!r}; groups: {', '.join(groups) or 'none'}")
    frozen = tuple(prefix for group in options.get("freeze", []) for prefix in groups[group])
    for name, parameter in model.named_parameters():
        parameter.requires_grad = not name.startswith(frozen) if frozen else True
    return model


FULL = Tuner(name="full", description="train every parameter (optionally freezing module groups)", prepare=prepare, check=check)


@hookimpl
def register_tuners(register):
    register(FULL)
