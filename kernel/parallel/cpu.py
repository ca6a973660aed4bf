"""Two switches accelerate 1.15 keeps for accelerator devices, opened for gloo on CPUs.

- FSDP: accelerate turns the Trainer's ``fsdp`` settings into FSDP only when the processes
  drive GPUs (or NPUs, XPUs, ...). With gloo on CPUs it keeps ``MULTI_CPU`` and silently
  trains plain DDP — every rank holding everything, while the plan says sharded.
- Tensor parallel: the Trainer builds a ``ParallelismConfig`` for a model loaded with a TP
  plan, and accelerate refuses it unless the world is ``MULTI_GPU``-like.

FSDP2 and DTensor themselves run on gloo (the tests train through both and compare with
one process), so the ``fsdp`` and ``tp`` strategies open these switches when their plan
is for CPUs. The run's manifest records what the trainer really wrapped the model in
(``parallel.wrapped_as``), and the tests check it, so a later accelerate that changes
these paths fails loudly instead of falling back.
"""

from __future__ import annotations

from typing import Any


def allow_fsdp_on_cpu() -> None:
    """Promote a multi-process CPU state to FSDP when an FSDP plugin is given."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState, "_modelloop_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    def __init__(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # every later AcceleratorState() copies the shared PartialState: promote it there too
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__
    AcceleratorState._modelloop_fsdp_on_cpu = True


def allow_tp_on_cpu() -> None:
    """Let a multi-process CPU world pass ``ParallelismConfig``'s device check (only that
    check: elsewhere accelerate still treats it as CPU, so the model is not DDP-wrapped)."""
    from accelerate import Accelerator
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DistributedType

    if getattr(ParallelismConfig, "_modelloop_tp_on_cpu", False):
        return
    original = ParallelismConfig._validate_accelerator

    def _validate_accelerator(self: Any, accelerator: Any) -> Any:
        if accelerator.distributed_type != DistributedType.MULTI_CPU:
            return original(self, accelerator)
        multi_device = Accelerator.multi_device
        Accelerator.multi_device = property(lambda _: True)
        try:
            return original(self, accelerator)
        finally:
            Accelerator.multi_device = multi_device

    ParallelismConfig._validate_accelerator = _validate_accelerator
    ParallelismConfig._modelloop_tp_on_cpu = True
