"""GaLore through galore-torch: full-parameter training with low-rank gradient projection."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelloop.plugin import Tuner, complete, hookimpl, positive

PLUGIN_API = ">=1.1,<2"  # the versions of modelloop.plugin this plugin is written against

DEFAULTS = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "targets": "default"}
PROJECTIONS = ("std", "reverse_std", "right", "left", "full")


def check(options: Mapping[str, Any]) -> dict[str, Any]:
    options = complete(options, DEFAULTS)
    positive(options, "rank")
    positive(options, "update_proj_gap")
    positive(options, "scale", float)
    if options["proj_type"] not in PROJECTIONS:
        raise ValueError(f"proj_type must be one of {', '.join(PROJECTIONS)}, got {options['proj_type']!r}")
    return options


def prepare(model: Any, options: Mapping[str, Any], family: Any) -> Any:
    """Full training: every parameter learns; GaLore acts in the optimizer."""
    for parameter in model.parameters():
        parameter.requires_grad = True
    return model


def parameter_groups(model: Any, options: Mapping[str, Any], family: Any) -> list[dict[str, Any]]:
    """Projected: the 2-D weights of the target linear layers. Everything else: plain AdamW."""
    import torch

    targets = options["targets"]
    if targets == "default":
        targets = list(family.lora_targets) if family is not None and family.lora_targets else None
    projected = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (targets is None or name.rsplit(".", 1)[-1] in targets):
            projected.append(module.weight)
    projected_ids = {id(p) for p in projected}
    plain = [p for p in model.parameters() if id(p) not in projected_ids]
    galore = {key: options[key] for key in ("rank", "update_proj_gap", "scale", "proj_type")}
    return [{"params": plain}, {"params": projected, **galore}]


def optimizer(groups: list[dict[str, Any]], **defaults: Any) -> Any:
    from galore_torch import GaLoreAdamW

    return GaLoreAdamW(groups, **defaults)


GALORE = Tuner(
    name="galore",
    description="full training with GaLore low-rank gradient projection (galore-torch)",
    prepare=prepare,
    check=check,
    parameter_groups=parameter_groups,
    optimizer=optimizer,
    trains_all_weights=True,
    requires=("galore_torch", "bitsandbytes"),  # galore_torch imports its 8-bit AdamW from bitsandbytes
)


@hookimpl
def register_tuners(register):
    register(GALORE)
