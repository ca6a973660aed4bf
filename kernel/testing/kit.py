"""What a conformance check is, and how one runs.

A check is one contract of one registered spec (``tuner 'lora': save and reload keep
its outputs``). Running it gives an ``Outcome``: passed, skipped with the reason (a
library or a GPU this machine lacks), or failed with one line naming the spec, its kind
and the contract it broke. The checks of each kind live in their own module of this
package (``modelloop.testing.distributions`` collects them for a distribution).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from modelloop.testing.workspace import Workspace


class Skip(Exception):
    """This machine cannot run the check (a missing library, no GPU); the reason says why."""


class Broken(Exception):
    """The spec broke the contract the check is about; the message says how, in one line."""


@dataclass(frozen=True)
class Check:
    """One contract of one registered spec.

    :param kind: the spec's kind as the registries name it (``tuner``, ``model``), or
        ``plugin`` for what holds for the whole plugin.
    :param spec: what the check runs against (a spec, or a plugin's name).
    :param contract: what is checked, as it reads in a passed line.
    :param run: ``run(spec, workspace)``: returns when the contract holds, raises
        ``Broken`` when it does not and ``Skip`` when this machine cannot tell.
    :param slow: takes more than a few seconds (several processes, a compilation).
    """

    kind: str
    spec: Any
    contract: str
    run: Callable[[Any, Workspace], None]
    slow: bool = False

    @property
    def subject(self) -> str:
        name = self.spec if isinstance(self.spec, str) else self.spec.name
        return f"{self.kind} {name!r}"

    @property
    def id(self) -> str:
        """A name for the check in a test report."""
        return f"{self.subject}: {self.contract}"


@dataclass(frozen=True)
class Outcome:
    """What running a check gave; ``reason`` says why it failed or was skipped."""

    check: Check
    status: Literal["passed", "failed", "skipped"]
    reason: str = ""
    error: BaseException | None = None

    def line(self) -> str:
        """One line: the spec, its kind, and the contract (or how it broke, or why it was not run)."""
        if self.status == "failed":
            return f"{self.check.subject}: {self.reason}"
        if self.status == "skipped":
            return f"{self.check.id} ({self.reason})"
        return self.check.id


def run_check(check: Check, workspace: Workspace) -> Outcome:
    """Run one check; whatever it raises becomes its outcome, never an exception."""
    try:
        check.run(check.spec, workspace)
    except Skip as skip:
        return Outcome(check, "skipped", str(skip))
    except Broken as broken:
        return Outcome(check, "failed", str(broken), broken)
    except Exception as error:  # noqa: BLE001 - a plugin may raise anything; say which contract it was at
        return Outcome(check, "failed", f"{check.contract}: it raised {raised(error)}", error)
    return Outcome(check, "passed")


def raised(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


def require(spec: Any, kind: str, *, gpu: bool = True) -> None:
    """Skip a check of a spec whose libraries (``requires``) this environment lacks, or
    (with ``gpu``) that runs on CUDA GPUs only (``needs_cuda``) on a machine without one."""
    from modelloop.errors import MissingLibraryError, require_libraries

    try:
        require_libraries(spec, kind)
    except MissingLibraryError as error:
        raise Skip(str(error)) from None
    if gpu and getattr(spec, "needs_cuda", False):
        import torch

        if not torch.cuda.is_available():
            raise Skip("it runs on CUDA GPUs only (needs_cuda), and this machine has none")
